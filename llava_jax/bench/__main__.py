"""Dispatch `python -m llava_jax.bench <name> [flags]` to `llava_jax.bench.<name>.main(argv)`."""

import importlib
import pkgutil
import sys

import llava_jax.bench as bench_pkg


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m llava_jax.bench <name> [flags]\navailable: " + ", ".join(names))
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"llava_jax.bench.{name}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

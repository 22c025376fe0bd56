"""`tfds build`, the same command and flags, for environments without apache-beam.

    python -m llava_jax.data.tfds_builders llava_jax/data/tfds_builders/llava_json \
        --manual_dir /data/llava --data_dir ~/tensorflow_datasets --config llava_v1_5_mix665k

The `tfds` command line of tensorflow-datasets 4.9.10 imports all its subcommands at start-up, and one
of them needs apache-beam, TensorFlow and mlcroissant, which `tensorflow-datasets` does not install
(https://github.com/tensorflow/datasets/issues/5463); apache-beam would also pin protobuf below the
version jax's stack uses. This runs only TFDS's own `build` subcommand (its parser and code, nothing
of ours), which needs neither, so where `tfds build` starts, both commands do the same.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from absl import app

    try:
        from tensorflow_datasets.scripts.cli import build, cli_utils

        build.Args, cli_utils.make_flags_parser  # noqa: B018 (the command line of tensorflow-datasets>=4.9.10)
    except ImportError as e:
        raise SystemExit(
            f"{e}\nbuilding a TFDS dataset needs tensorflow-datasets: pip install 'llava_jax[tfds]'"
        ) from None
    except AttributeError:
        raise SystemExit(
            "this command needs tensorflow-datasets>=4.9.10 (pip install 'llava_jax[tfds]'); "
            "with an older version use `tfds build` (the same flags)"
        ) from None
    parse = cli_utils.make_flags_parser(build.Args, description="tfds build (the build subcommand of the tfds CLI)")
    app.run(
        lambda args: args.execute(), argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)], flags_parser=parse
    )


if __name__ == "__main__":
    main()

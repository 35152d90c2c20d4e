"""The options every training command (train, dreambooth, text-to-image) shares: --set, --overwrite, --resume,
--quiet."""

from __future__ import annotations


def add_run_options(parser, example: str = "train.steps=100", overwrite: str = "") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever output_dir holds" + overwrite)
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

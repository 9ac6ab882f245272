"""`harness lm-eval ARGS...`: lm-evaluation-harness's own command line, with the harness
plugin loaded (the model `harness`) and its task folder on the include path.

Every argument goes to lm-eval unchanged (`run` is implied, as with `lm-eval` itself):

    harness lm-eval --model harness --model_args pretrained=results/smoke/runs/RUN_ID \\
        --tasks harness_bpb,harness_arc_easy_local --device cpu
    harness lm-eval ls tasks

A user's own `--include_path DIR` is searched after the plugin's folder. Unless they are set
already, HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set to 1: the plugin's tasks need no
network, and nothing reaches the Hub unless asked (set them to 0 to let lm-eval download
Hub tasks such as hellaswag).

Two messages lm-eval prints on every run are silenced here (`quiet_lm_eval`): git's "fatal:
not a git repository" from lm-eval's git-hash probe (run outside a git checkout; the hash is
then null, as before), and the warning that tasks with a custom dataset take `--metadata`
(the plugin's own tasks read their metadata from --model_args).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
METADATA_HINT = "Custom kwargs can be passed to `--metadata`"  # lm_eval.api.task's warning, once per custom-dataset task


class _DropMetadataHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return METADATA_HINT not in record.getMessage()


def _quiet_git_commit_hash() -> str | None:
    """lm-eval's get_git_commit_hash (`git describe --always`, else the .git folder) with git's stderr dropped."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def quiet_lm_eval() -> None:
    """Silence git's "fatal: not a git repository" (lm-eval's git probe) and the `--metadata` hint."""
    import lm_eval.evaluator

    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = _quiet_git_commit_hash
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropMetadataHint) for f in task_logger.filters):
        task_logger.addFilter(_DropMetadataHint())


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # prefix_chars="+": this parser must take `--model ...` as data for lm-eval, not as its own
    # options (argparse.REMAINDER alone refuses a remainder that starts with an option)
    parser = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="+",
        help="run lm-evaluation-harness on harness checkpoints (all arguments go to lm-eval)",
        description="lm-evaluation-harness's command line with the model `harness` registered and the plugin's "
                    "tasks (harness_bpb, harness_arc_easy_local) found without --include_path.")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="lm-eval arguments, e.g. --model harness --model_args pretrained=RUN_DIR --tasks harness_bpb")
    parser.set_defaults(func=cmd_lm_eval)
    return parser


def cmd_lm_eval(args: argparse.Namespace) -> None:
    run(args.lm_eval_args)


def run(argv: list[str]) -> None:
    """Run lm-eval's CLI on argv (without the program name) with the plugin loaded."""
    unset = [name for name in OFFLINE_VARIABLES if name not in os.environ]
    for name in unset:  # before lm-eval imports datasets / huggingface_hub, which read them once
        os.environ[name] = "1"
    if unset:
        print(f"harness lm-eval: offline ({', '.join(n + '=1' for n in unset)}); set them to 0 to let lm-eval "
              "download Hub tasks", file=sys.stderr)

    import harness.lm_eval_plugin as plugin  # registers the model `harness`

    quiet_lm_eval()
    try:
        from lm_eval._cli import HarnessCLI
    except ImportError:  # lm-eval before the subcommand CLI: one flat parser that reads sys.argv
        from lm_eval.__main__ import cli_evaluate

        extra = [] if "--include_path" in argv else ["--include_path", str(plugin.TASKS_DIR)]
        _with_argv([*argv, *extra], cli_evaluate)
        return
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    namespace = _with_argv(list(argv), cli.parse_args)  # parse_args reads sys.argv (and inserts `run`)
    if hasattr(namespace, "include_path"):  # run, ls and validate take one; TaskManager accepts a list
        namespace.include_path = plugin.include_paths(namespace.include_path)
    cli.execute(namespace)


def _with_argv(argv: list[str], function):
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        return function()
    finally:
        sys.argv = saved


if __name__ == "__main__":  # python -m harness.commands.lm_eval ARGS  (same as `harness lm-eval ARGS`)
    from harness.errors import HarnessError

    try:
        run(sys.argv[1:])
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        sys.exit(2)

"""The harness's trainer against a trusted peer: nanoGPT's documented CPU recipe on char-rnn's
tinyshakespeare (4 layers x 128, block 64, batch 12, 2,000 iterations, lr 1e-3 with 100 warmup
iterations and a cosine to 1e-4, the first 90% to train: 1.536 M training bytes).

    python results/nanogpt_peer/peer.py PATH/TO/tinyshakespeare/input.txt [--nanogpt PATH/TO/nanoGPT]

Every row is scored on the same bytes: the held-out 10% split in half (validation, then test),
cut into 64-byte windows, positions 1-63 of each scored, so every prediction has the same
context in every row (nanoGPT's block predicts 63 bytes of a window from the ones before).
Rows:
- the harness's bytes adapter trained by the harness's trainer, with shuffled fixed windows or
  random offsets (TrainerSettings.sampling), and beta2 0.95 (the harness's default) or 0.99
  (the recipe's);
- with --nanogpt (a checkout of karpathy/nanoGPT): nanoGPT's train.py as it is, and nanoGPT's
  train.py driving the harness's bytes model (a model.py with nanoGPT's interface around the
  adapter, so both trainers train the same model on the same objective). nanoGPT's train.py
  picks its checkpoint by validation loss, and seeds itself with 1337 (here 1337 + seed for
  the harness model).
Figures go to results/nanogpt_peer/figures.md (the text itself is never committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness.api import registry
from harness.run.data import TrainStream, windows
from harness.run.spec import TrainerSettings
from harness.run.train import train

TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BLOCK, BATCH, ITERS, LR, WARMUP_FRACTION, MIN_LR_RATIO = 64, 12, 2000, 1e-3, 1 / 20, 0.1  # 100 warmup iterations
MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4}


def nanogpt_args(iters: int) -> list[str]:
    """nanoGPT README's CPU command; float32 because a CPU has no float16 GradScaler."""
    return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
            f"--eval_interval={min(250, iters)}", "--log_interval=100", f"--block_size={BLOCK}", f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4",
            "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--warmup_iters={round(iters * WARMUP_FRACTION)}",
            "--dropout=0.0", "--dtype=float32"]

# nanoGPT's model.py interface around the harness's bytes adapter, so nanoGPT's train.py trains it
SHIM = '''
import os
from dataclasses import dataclass
import torch
from harness.api import registry

@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        torch.manual_seed(1337 + int(os.environ.get("PEER_SEED", "0")))  # model and batches follow the seed
        self.config = config
        self.adapter = registry.build("bytes", {"d_model": config.n_embd, "n_layers": config.n_layer,
                                                "n_heads": config.n_head})

    def forward(self, idx, targets=None):
        # the harness's objective on the window idx: every byte, the first one after BOS
        logits = self.adapter.next_byte_logits(idx)
        return logits, torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), idx)

    def crop_block_size(self, block_size):
        self.config.block_size = block_size  # positions are rotary: nothing to crop

    def get_num_params(self, non_embedding=True):
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        flops = 3 * self.adapter.flops_per_byte(self.config.block_size)["total"] * self.config.block_size
        return flops * fwdbwd_per_iter / dt / 312e12  # nanoGPT's yardstick: an A100's bfloat16 peak
'''


def splits(text: bytes) -> tuple[bytes, bytes, bytes]:
    """nanoGPT's split (the first 90% to train), its 10% halved into validation and test."""
    cut = int(len(text) * 0.9)
    held = text[cut:]
    return text[:cut], held[: len(held) // 2], held[len(held) // 2 :]


def bits_per_byte(nll_per_position: torch.Tensor) -> float:
    """bpb of positions 1-63 of each window, from (windows, 64) NLL in nats."""
    return float(nll_per_position[:, 1:].double().sum() / (math.log(2) * nll_per_position[:, 1:].numel()))


@torch.no_grad()
def score_adapter(model, held: bytes) -> float:
    model.eval()
    return bits_per_byte(torch.cat([model(w) for w in windows(held, BLOCK).split(256)]))


def harness_row(train_bytes: bytes, held: dict[str, bytes], sampling: str, beta2: float, seed: int, iters: int) -> dict:
    torch.manual_seed(seed)
    model = registry.build("bytes", MODEL)
    settings = TrainerSettings(batch_windows=BATCH, lr=LR, warmup_fraction=WARMUP_FRACTION, min_lr_ratio=MIN_LR_RATIO,
                               weight_decay=0.1, betas=(0.9, beta2), grad_clip=1.0, sampling=sampling, log_every=100)
    result = train(model, TrainStream(train_bytes, BLOCK, BATCH, seed, sampling), settings, iters, torch.device("cpu"),
                   description=f"harness {sampling} beta2={beta2} seed {seed}")
    return {"trainer": "harness", "model": "harness bytes", "sampling": sampling, "beta2": beta2, "seed": seed,
            "ms_per_iter": round(1000 * result.seconds / result.steps, 1)} | {split: round(score_adapter(model, text), 4) for split, text in held.items()}


def write_bin(directory: Path, ids: dict[str, np.ndarray], vocab: dict) -> None:
    directory.mkdir(parents=True)
    for name, values in ids.items():
        values.astype(np.uint16).tofile(directory / f"{name}.bin")
    (directory / "meta.pkl").write_bytes(pickle.dumps(vocab))


def run_nanogpt(nanogpt: Path, work: Path, dataset: str, model_py: Path, seed: int, iters: int) -> tuple[Path, float]:
    """nanoGPT's train.py on the recipe in `work` (its own files linked, model.py as given): its
    checkpoint and the median time of the iterations it logged (its own timing, evaluations left out)."""
    shutil.copy(nanogpt / "train.py", work)  # a copy: Python puts a linked script's real folder on sys.path
    for name in ("configurator.py", "config"):
        (work / name).symlink_to(nanogpt / name)
    (work / "model.py").symlink_to(model_py)
    out = work / "out"
    env = os.environ | {"PEER_SEED": str(seed), "PYTHONPATH": os.pathsep.join([str(work), *sys.path])}
    done = subprocess.run([sys.executable, "train.py", *nanogpt_args(iters), f"--dataset={dataset}", f"--out_dir={out}"],
                          cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: nanoGPT's train.py failed in {work}: {done.stderr.strip().splitlines()[-1]}")
    times = [float(t) for t in re.findall(r"^iter [1-9]\d*: .*time ([\d.]+)ms", done.stdout, re.MULTILINE)]
    return out / "ckpt.pt", round(float(np.median(times)), 1)


def nanogpt_rows(nanogpt: Path, train_bytes: bytes, held: dict[str, bytes], seeds: list[int], iters: int) -> list[dict]:
    rows = []
    chars = sorted(set(train_bytes + b"".join(held.values())))
    stoi = {c: i for i, c in enumerate(chars)}
    as_ids = lambda b: np.array([stoi[c] for c in b])  # noqa: E731  (nanoGPT's character ids)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "as_is"
        write_bin(work / "data" / "peer_chars", {"train": as_ids(train_bytes), "val": as_ids(held["val"])},
                  {"vocab_size": len(chars), "itos": {i: chr(c) for i, c in enumerate(chars)},
                   "stoi": {chr(c): i for i, c in enumerate(chars)}})
        ckpt, ms_per_iter = run_nanogpt(nanogpt, work, "peer_chars", nanogpt / "model.py", 0, iters)
        sys.path.insert(0, str(nanogpt))
        from model import GPT, GPTConfig  # nanoGPT's own model, to score its checkpoint

        saved = torch.load(ckpt, map_location="cpu")
        model = GPT(GPTConfig(**saved["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
        model.eval()
        scores = {}
        for split, text in held.items():
            ids = torch.from_numpy(as_ids(text)[: len(text) // BLOCK * BLOCK].reshape(-1, BLOCK)).long()
            with torch.no_grad():
                logits, _ = model(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            scores[split] = round(bits_per_byte(torch.nn.functional.pad(nll, (1, 0))), 4)
        rows.append({"trainer": "nanoGPT", "model": "nanoGPT", "sampling": "offsets", "beta2": 0.99, "seed": 0,
                     "ms_per_iter": ms_per_iter} | scores)
        shim = Path(tmp) / "harness_model.py"
        shim.write_text(SHIM)
        for seed in seeds:
            work = Path(tmp) / f"harness_model_{seed}"
            raw = {name: np.frombuffer(b, dtype=np.uint8) for name, b in (("train", train_bytes), ("val", held["val"]))}
            write_bin(work / "data" / "peer_bytes", raw, {"vocab_size": 256})
            ckpt, ms_per_iter = run_nanogpt(nanogpt, work, "peer_bytes", shim, seed, iters)
            model = registry.build("bytes", MODEL)
            saved = torch.load(ckpt, map_location="cpu")["model"]
            model.load_state_dict({k.removeprefix("adapter."): v for k, v in saved.items()})
            rows.append({"trainer": "nanoGPT", "model": "harness bytes", "sampling": "offsets", "beta2": 0.99,
                         "seed": seed, "ms_per_iter": ms_per_iter}
                        | {split: round(score_adapter(model, text), 4) for split, text in held.items()})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["trainer", "model", "sampling", "beta2", "seed", "val", "test", "ms_per_iter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("text", type=Path, help="char-rnn's data/tinyshakespeare/input.txt")
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT: adds its rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iters", type=int, default=ITERS, help="the recipe's 2000; fewer only to try the script")
    parser.add_argument("--only", choices=["harness", "nanogpt"], help="run one side only")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("figures.json"))
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"error: {args.text}: no such file")
    text = args.text.read_bytes()
    if hashlib.sha256(text).hexdigest() != TINYSHAKESPEARE_SHA256:
        sys.exit(f"error: {args.text}: not char-rnn's tinyshakespeare (sha256 {TINYSHAKESPEARE_SHA256[:12]}...)")
    if args.nanogpt and not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: --nanogpt {args.nanogpt}: no train.py there")
    train_bytes, val, test = splits(text)
    held = {"val": val, "test": test}
    rows = []
    if args.only != "nanogpt":
        rows += [harness_row(train_bytes, held, sampling, beta2, seed, args.iters) for sampling in ("windows", "offsets")
                 for beta2 in (0.95, 0.99) for seed in args.seeds]
    if args.nanogpt and args.only != "harness":
        rows += nanogpt_rows(args.nanogpt, train_bytes, held, args.seeds, args.iters)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()},
                                   indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

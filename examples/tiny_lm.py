"""Which lines of Python's own source taught a tiny language model? DVEmb on a byte-level transformer (CPU, offline).

A small causal transformer (2 blocks, width 64, 4 heads, context 64, bytes as tokens) is trained with plain
SGD on the source text of a few standard-library modules read from the interpreter's own ``stdlib`` folder plus
the Zen of Python (no download; the text is whatever this Python ships). Lines of source are packed into
sequences of at most 65 bytes, so sequences have different lengths and are padded. The ``DataValueEmbedding``
callback records every (step, sequence) and, when training ends, writes the per-step influence curve of the
language model on the validation loss, the early / middle / late stage summary and the most helpful and harmful
training sequences, shown as text through ``describe=``.

The loss of a sequence is its per-token cross-entropy averaged over its own tokens. The batch loss is, by
default, the token-weighted mean (every token of the batch counts once), i.e. sequence ``i`` enters with weight
``n_i / sum_j n_j``; the callback is told so with ``loss_reduction=callable(batch) -> Tensor[B]``.
``--loss-weighting sequences`` uses the plain mean of the per-sequence means instead (``loss_reduction="mean"``).

    python examples/tiny_lm.py                       # offline W&B run (sync later with `wandb sync`)
    python examples/tiny_lm.py --logger tensorboard  # or: csv, none
    python examples/tiny_lm.py --quick               # a smoke run of a few seconds of training

Everything lands under ``--out`` (default ``./tiny_lm_run``): the store and ``dve/report/`` (CSV, JSON, PNG)
plus the logger's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sysconfig
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_dve import DataValueEmbedding
from lightning_dve.config import ReportConfig
from lightning_dve.reporting import format_summary, top_k_heading

#: Standard-library modules whose source is the corpus (small, pure Python, present in every CPython 3).
MODULES = ("textwrap", "heapq", "string", "fnmatch", "colorsys", "bisect", "shlex", "glob")
PAD = -100  # ignore_index of the cross-entropy: padded target positions


def zen_of_python() -> str:
    """The Zen of Python, decoded from the ``this`` module (whose import prints it; the print is swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(c, c) for c in this.s)


def corpus_lines() -> list[bytes]:
    """Every line (with its newline) of the Zen and of the :data:`MODULES` sources, as UTF-8 bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [zen_of_python()] + [(stdlib / f"{name}.py").read_text(encoding="utf-8") for name in MODULES]
    return [line.encode("utf-8") for text in texts for line in text.splitlines(keepends=True)]


def pack_sequences(lines: list[bytes], max_len: int) -> list[bytes]:
    """Pack consecutive lines into sequences of at most ``max_len`` bytes (longer lines are cut)."""
    sequences, current = [], b""
    for line in lines:
        while len(line) > max_len:  # a line longer than a sequence: cut it
            if current:
                sequences.append(current)
                current = b""
            sequences.append(line[:max_len])
            line = line[max_len:]
        if len(current) + len(line) > max_len:
            sequences.append(current)
            current = b""
        current += line
    if current:
        sequences.append(current)
    return [s for s in sequences if len(s) >= 8]  # drop crumbs (a lone blank line teaches little)


class ByteSequences(Dataset):
    """Byte sequences as ``{"input_ids": long [C], "targets": long [C], "n_tokens": long, "index": long}``.

    ``input_ids`` are the bytes ``s[:-1]`` and ``targets`` the bytes ``s[1:]`` of a sequence ``s``, both padded
    to the context length ``C`` (``targets`` with :data:`PAD`, ignored by the loss). ``index`` is the sequence's
    position in the whole corpus: the sample id the callback records.
    """

    def __init__(self, sequences: list[bytes], indices: torch.Tensor, context: int) -> None:
        self.indices = indices
        self.texts = [sequences[i] for i in indices.tolist()]
        n = len(self.texts)
        self.input_ids = torch.zeros(n, context, dtype=torch.long)
        self.targets = torch.full((n, context), PAD, dtype=torch.long)
        self.n_tokens = torch.zeros(n, dtype=torch.long)
        for row, text in enumerate(self.texts):
            data = torch.tensor(list(text), dtype=torch.long)
            self.input_ids[row, : len(text) - 1] = data[:-1]
            self.targets[row, : len(text) - 1] = data[1:]
            self.n_tokens[row] = len(text) - 1

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "targets": self.targets[i], "n_tokens": self.n_tokens[i],
                "index": self.indices[i]}


def snippet(text: bytes, width: int = 72) -> str:
    """One printable line for a sequence (newlines shown as ``⏎``)."""
    shown = text.decode("utf-8", errors="replace").replace("\n", "⏎").replace("\t", "→")
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def describe(sample: dict[str, torch.Tensor]) -> str:
    """Text of one training sequence (a row of a batch) for the W&B / TensorBoard top-k tables."""
    n = int(sample["n_tokens"])
    data = sample["input_ids"][:n].tolist() + sample["targets"][n - 1 : n].tolist()
    return snippet(bytes(data), width=120)


def token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``w_i = n_i / sum_j n_j``: the weight of sequence ``i``'s mean token loss in the token-weighted batch loss."""
    n = batch["n_tokens"].to(torch.float64)
    return n / n.sum()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with q, k, v and output projections as plain ``nn.Linear`` modules.

    The callback captures per-sample gradients with hooks on modules that are *called*; ``nn.MultiheadAttention``
    uses its ``out_proj`` weight functionally (the callback refuses it), so attention is built from Linears here.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D / H]
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(L.LightningModule):
    """Byte-level causal transformer: token + position embeddings, ``layers`` blocks, final LayerNorm, LM head.

    The head is a separate ``nn.Linear`` (not tied to the token embedding: a tied weight would be used
    functionally by one of the two). Plain SGD with a cosine schedule (plain SGD is DVEmb's exact target).
    """

    def __init__(self, context: int = 64, width: int = 64, heads: int = 4, layers: int = 2, lr: float = 0.3,
                 token_weighted: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        # Positions are looked up per sample ([B, T], not [T]): every tracked layer must see the batch first.
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def sequence_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B]`` per-sequence loss: cross-entropy of each real (non-padded) token, averaged over the sequence."""
        logits = self(batch["input_ids"])
        per_token = F.cross_entropy(logits.transpose(1, 2), batch["targets"], ignore_index=PAD, reduction="none")
        return per_token.sum(dim=1) / batch["n_tokens"].to(per_token.dtype)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token-weighted (``sum_i w_i l_i`` with :func:`token_weights`) or plain mean of the sequence losses."""
        losses = self.sequence_losses(batch)
        if self.hparams.token_weighted:
            return (token_weights(batch).to(losses.dtype) * losses).sum()
        return losses.mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.batch_loss(batch), batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.1 * self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def validation_loss(model: TinyLM, data: ByteSequences) -> float:
    """Token-weighted mean cross-entropy of ``data`` (nats per byte) at the model's current weights."""
    model.eval()
    losses = model.sequence_losses({"input_ids": data.input_ids, "targets": data.targets, "n_tokens": data.n_tokens})
    return float((losses * data.n_tokens).sum() / data.n_tokens.sum())


def make_logger(kind: str, out: Path) -> Logger | bool:
    """The logger chosen on the command line (an offline W&B run by default)."""
    if kind == "wandb":
        return WandbLogger(project="lightning_dve-tiny_lm", save_dir=str(out), offline=True)
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(out), name="tensorboard")
    if kind == "csv":
        return CSVLogger(save_dir=str(out), name="csv")
    return False


QUICK = {"max_steps": 12, "train_size": 96, "val_size": 32, "projection_dim": 32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logger", choices=("wandb", "tensorboard", "csv", "none"), default="wandb")
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no cap)")
    parser.add_argument("--quick", action="store_true", help="smoke run: --max-steps 12 --train-size 96 --val-size "
                        "32 --projection-dim 32 (options given explicitly still win)")
    parser.add_argument("--out", type=Path, default=Path("tiny_lm_run"))
    parser.add_argument("--train-size", type=int, default=1600, help="training sequences (of the corpus' "
                        "~1800; --val-size others validate)")
    parser.add_argument("--val-size", type=int, default=128, help="validation sequences (the reference set)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64, help="tokens (bytes) per sequence")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.3, help="plain SGD learning rate (cosine to 10%%; at 1.0 the "
                        "recursion's step factors expand and the fit warns that its scores are unreliable)")
    parser.add_argument("--loss-weighting", choices=("tokens", "sequences"), default="tokens",
                        help="batch loss: token-weighted mean (loss_reduction=callable) or mean of sequence means")
    parser.add_argument("--projection-dim", type=int, default=256, help="projected size per tracked layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress-bar", action="store_true", help="quiet run (also hides the report's bar)")
    if parser.parse_args(argv).quick:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Train, report, print the summary and the top sequences as text; return the report folder."""
    args = parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    L.seed_everything(args.seed, verbose=False)
    sequences = pack_sequences(corpus_lines(), args.context + 1)
    if args.train_size + args.val_size > len(sequences):
        raise SystemExit(f"--train-size + --val-size must be <= {len(sequences)} (sequences in the corpus); got "
                         f"{args.train_size + args.val_size}.")
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(args.seed))
    train = ByteSequences(sequences, order[: args.train_size], args.context)
    val = ByteSequences(sequences, order[args.train_size : args.train_size + args.val_size], args.context)
    token_weighted = args.loss_weighting == "tokens"

    logger = make_logger(args.logger, args.out)
    callback = DataValueEmbedding(
        save_dir=args.out / "dve", projection_dim=args.projection_dim, overwrite=True,
        # The batch loss weights sequence i by n_i / sum_j n_j (its token count): tell the callback, so that it
        # stores the gradient of each sequence's own mean token loss and puts the weight into the step.
        loss_reduction=token_weights if token_weighted else "mean",
        # The LayerNorms train but are left unmeasured, as in the figures the README quotes for this example
        # (tracked by default since session 31: drop this line to measure them too, 2 x width dims each).
        exclude=("*ln*",),
        report=ReportConfig(top_k=10), describe=describe)
    model = TinyLM(context=args.context, width=args.width, heads=args.heads, layers=args.layers, lr=args.lr,
                   token_weighted=token_weighted)
    trainer = L.Trainer(max_epochs=args.max_epochs, max_steps=args.max_steps, accelerator="cpu", devices=1,
                        logger=logger, callbacks=[callback], enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=str(args.out), log_every_n_steps=10, num_sanity_val_steps=0,
                        enable_progress_bar=not args.no_progress_bar)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True), DataLoader(val, batch_size=64))

    report = args.out / "dve" / "report"
    print(f"Corpus: {len(sequences)} sequences of <= {args.context + 1} bytes from the Zen of Python and "
          f"{', '.join(MODULES)}; trained on {len(train)}, validated on {len(val)}; final validation loss "
          f"{validation_loss(model, val):.3f} nats/byte ({trainer.global_step} SGD steps).")
    if isinstance(logger, WandbLogger):
        import wandb

        print(f"W&B run (offline): {Path(logger.experiment.dir).parent}  (upload with `wandb sync <that folder>`)")
        wandb.finish()
    elif isinstance(logger, Logger):
        print(f"{type(logger).__name__} logs: {logger.log_dir}")
    print(f"Report folder: {report}  (curve.png, curve.csv, summary.json, ...)")
    summary = json.loads((report / "summary.json").read_text())
    text = format_summary(summary, k=5).splitlines()
    first_top = next((i for i, line in enumerate(text) if line.startswith("Top-")), len(text))
    print("\n".join(text[:first_top]))  # reference, stage summary, phases; the top-k follow with their text
    texts = {int(i): t for i, t in zip(train.indices.tolist(), train.texts)}
    for name, rows in summary["top_k"].items():
        print(top_k_heading(name, min(5, len(rows)), "training sequences"))
        for r in rows[:5]:
            print(f"  #{r['rank']} id {r['sample_id']:>5}  score {r['score']:+.3e}  steps [{r['steps']}]  "
                  f"{snippet(texts[int(r['sample_id'])])!r}")
    return report


if __name__ == "__main__":
    main()

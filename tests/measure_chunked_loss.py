"""Measure what the chunked loss saves: peak RSS of one forward + backward at vocabulary
50304, T = 1024, batch 1 (d_model 256, 2 layers: the head dominates, as it does in GPT-2),
each variant in a fresh process (ru_maxrss is a process's high-water mark, never lowered):

    plain         logits for all tokens, F.cross_entropy (GPT.loss with loss_chunk_tokens 0)
    chunked       sdtrain's chunked loss (gradients made per chunk in forward, no recompute)
    checkpointed  the alternative: torch.utils.checkpoint around each chunk's head + loss
                  (recomputes the chunk's logits in backward)

    .venv/bin/python tests/measure_chunked_loss.py [--chunk 128] [--batch 1]

Prints one line per variant: RSS once the model is built, the peak over the step, and the
step's own peak above the built model (the number to compare). Not a test: it prints;
tests/test_chunked_loss.py holds the chunked path to a stated margin below the plain one.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

VOCAB, SEQ_LEN, D_MODEL, N_LAYERS, N_HEADS = 50304, 1024, 256, 2, 4
VARIANTS = ("plain", "chunked", "checkpointed")
REPO = Path(__file__).resolve().parent.parent


def logits_mib(batch: int) -> float:
    """The fp32 logits of the whole batch: what the plain path makes and the chunked one does not."""
    return batch * SEQ_LEN * VOCAB * 4 / 2**20


def run_variant(variant: str, batch: int, chunk: int) -> dict:
    """One forward + backward in this process; its memory in MiB."""
    import psutil
    import torch

    from sdtrain.model import GPT, GPTConfig

    torch.set_num_threads(1)  # the same work in every variant, whatever the machine's load
    cfg = GPTConfig(n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, seq_len=SEQ_LEN, vocab_size=VOCAB)
    model = GPT(cfg, loss_chunk_tokens=chunk if variant == "chunked" else 0)
    data = torch.randint(0, VOCAB, (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = data[:, :-1], data[:, 1:]
    built_mib = psutil.Process().memory_info().rss / 2**20
    hidden = model(inputs)
    if variant == "checkpointed":
        loss = _checkpointed_loss(model, hidden, targets, chunk)
    else:
        loss = model.loss(hidden, targets)
    loss.backward()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return {"variant": variant, "batch": batch, "chunk": chunk, "loss": loss.item(),
            "built_mib": round(built_mib, 1), "peak_mib": round(peak_mib, 1),
            "step_peak_mib": round(peak_mib - built_mib, 1)}


def _checkpointed_loss(model, hidden, targets, chunk):
    """Head + loss per chunk of the final hidden states, each under activation checkpointing."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    hidden, targets = hidden.flatten(0, 1), targets.reshape(-1)

    def chunk_loss_sum(h, t):
        return F.cross_entropy(model.logits(h).float(), t, reduction="sum")

    total = sum(checkpoint(chunk_loss_sum, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, hidden.size(0), chunk))
    return total / targets.numel()


def measure(variants, batch: int = 1, chunk: int = 128) -> dict[str, dict]:
    """run_variant for each of `variants`, each in a fresh Python process (so that no other
    variant's peak counts), all at once (one thread each)."""
    procs = {v: subprocess.Popen([sys.executable, __file__, "--variant", v, "--batch", str(batch), "--chunk", str(chunk)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for v in variants}
    rows = {}
    for v, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{v} failed:\n{out}{err}")
        rows[v] = json.loads(out.splitlines()[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="run only this one, here, and print its JSON")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=128, help="tokens per chunk")
    args = parser.parse_args()
    if args.variant:
        sys.path.insert(0, str(REPO))
        print(json.dumps(run_variant(args.variant, args.batch, args.chunk)))
        return
    print(f"vocab {VOCAB}, T {SEQ_LEN}, batch {args.batch}, d_model {D_MODEL}, {N_LAYERS} layers, chunk {args.chunk}: "
          f"whole fp32 logits {logits_mib(args.batch):.0f} MiB")
    rows = measure(VARIANTS, args.batch, args.chunk)
    for v, row in rows.items():
        saved = rows["plain"]["step_peak_mib"] - row["step_peak_mib"]
        print(f"{v:13s} built {row['built_mib']:7.1f} MiB  peak {row['peak_mib']:7.1f} MiB  step peak {row['step_peak_mib']:7.1f} MiB"
              f"  (saves {saved:6.1f} MiB, plain/this {rows['plain']['step_peak_mib'] / row['step_peak_mib']:.2f}x)"
              f"  loss {row['loss']:.6f}")


if __name__ == "__main__":
    main()

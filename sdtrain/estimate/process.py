"""The process itself: what a worker holds before it makes a weight.

On CPU the measured peak is the resident set (ru_maxrss): Python, torch's libraries, gloo,
the rank's threads, and the corpus as it is read. Measured on this project's CPU machine:
0.325 GiB for a 35k-parameter model at 2 ranks (summary.json's peak_mem_gib). On CUDA the
peak is the caching allocator's (max_memory_allocated), which counts tensors only: no base,
but the allocator's rounding and fragmentation, which CUDA_OVERHEAD stands for.
"""

from __future__ import annotations

from sdtrain.estimate.shape import RankShape
from sdtrain.estimate.terms import ALWAYS, Term

CPU_BASE_BYTES = int(0.325 * 2**30)
TEXT_COPIES = 3  # the texts, their encoded bytes, and the joined corpus, at once (sources.py)


def process_base(shape: RankShape) -> list[Term]:
    if shape.device == "cuda":
        return []
    terms = [Term("process base", CPU_BASE_BYTES, ALWAYS, "Python + torch + gloo resident set (measured)")]
    if shape.data_bytes:
        terms.append(Term("corpus", TEXT_COPIES * shape.data_bytes, ALWAYS,
                          f"{TEXT_COPIES} copies of up to data.max_bytes while the text is read"))
    return terms

"""Memory per rank, planned before a launch: what a run will hold, term by term, whether it
fits where it will run, and what to change when it does not (issue 12).

terms.py       the Term / Estimate records and the sum over the phases of a step
shape.py       what one rank runs, in numbers: the input of every term
state.py       model state (weights, gradients, optimizer) as each strategy really keeps it
activations.py what forward keeps for backward (Korthikanti et al. 2022, calibrated to our GPT)
buffers.py     transient buffers: DDP buckets, ZeRO reduce-scatters and gathers, loss, optimizer
process.py     the process itself: interpreter, torch, gloo, the corpus
plan.py        a recipe -> the estimate of its largest rank
fit.py         what each rank may have (cgroup, free memory, GPU) and the verdict
suggest.py     the cheapest changes that make a plan fit, each with its new estimate
verdict.py     estimate against budget: fits or not, and the message saying why
table.py       the table `sdtrain estimate` prints
cli.py         a recipe resolved as `launch` would, for `estimate` and `preflight --recipe`
"""

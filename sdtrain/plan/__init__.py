"""The layout planner, `sdtrain plan` (issue 23): every layout of a recipe's model and global
batch over a cluster, its memory per rank (from the estimate, not a second memory model) and
its step time (a model of compute, communication, bubble, optimizer step and offload I/O),
ranked; the best written as a recipe, and checked against measured runs. Torch-free except
measure.py, which only runs when the cluster is measured here.

candidate.py   one layout: its axes, and its name (pp2-tp1-dp2-z3-mb4-ac0)
cluster.py     the cluster planned for: given by flags or a YAML file
measure.py     ... or measured on this machine (peak, bandwidths, efficiency), cached
enumerate.py   every layout, and the reason for each one that cannot run
memory.py      a layout -> the estimate's peak bytes per rank (device, host, disk)
time_model.py  a layout -> its step time, term by term
rank.py        all of it together: the layouts that fit, fastest first
explain.py     one layout's terms, as text
write.py       a layout -> a recipe that launches as is
verify.py      launch a few layouts, and predicted beside measured
"""

"""ZeRO-Offload / ZeRO-Infinity: optimizer state (and, at stage 3, weight shards) kept off the
device, in host memory (`cpu`) or in files on a local disk (`nvme`): store.py holds the
files, optimizer.py steps Adam through them."""

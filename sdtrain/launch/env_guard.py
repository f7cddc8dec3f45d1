"""The variables a `.sdtrain_env` may set only where the launch allows each by name.

A `.sdtrain_env` is found, not named (exports.py): a checkout someone else wrote can carry
one. A variable it sets reaches every worker, its shell and whatever they start, so a
variable whose value chooses which code runs is as good as running that code. Each row of
GUARDED is a name or a shell-style pattern (`*`: any characters) and why it runs code. Two
rows are there for another reason: the drills (they make the run fail on purpose), and
CUDA_VISIBLE_DEVICES (the plan counts and places devices without the file, and a node agent
indexes its slots into the file's list: slot 0 becomes another device than `--dry-run`
printed, and slots past the list's end stop the node). Anything else passes with the launch's notice
(names only): NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, OMP_NUM_THREADS, HF_HOME,
MALLOC_ARENA_MAX and the other tuning knobs choose how code runs, not which.

Checked against torch 2.13 (which TORCH*/TRITON variables name code it loads: most are
tuning, these few are caches and paths it imports or compiles from) and NCCL 2.2x.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

GUARDED: tuple[tuple[str, str], ...] = (
    ("PYTHON*", "Python imports from PYTHONPATH, PYTHONHOME and PYTHONUSERBASE and runs PYTHONSTARTUP"),
    ("LD_*", "the dynamic loader loads LD_PRELOAD and LD_AUDIT into every program and finds libraries on "
             "LD_LIBRARY_PATH"),
    ("PATH", "chooses which program each command name runs (python, ssh, nvidia-smi, a compiler)"),
    ("GCONV_PATH", "glibc loads character-set converters as shared libraries from it"),
    ("BASH_ENV", "every non-interactive bash sources this file first"),
    ("ENV", "sh sources this file when it starts interactively"),
    ("SHELLOPTS", "bash turns these options on at start; with xtrace it runs the command substitutions in PS4"),
    ("PS4", "bash expands it, command substitutions included, before each traced command"),
    ("NCCL_*_PLUGIN", "NCCL loads the plugin library it names (net, tuner, profiler, env)"),
    ("NCCL_CONF_FILE", "NCCL reads its variables from this file, a plugin among them"),
    ("CUDA_INJECTION*_PATH", "the CUDA driver loads this library into the process"),
    ("NVTX_INJECTION*_PATH", "NVTX loads this library into the process"),
    ("TORCH_EXTENSIONS_DIR", "torch builds and imports its C++ extensions from this folder"),
    ("TORCHINDUCTOR_*_DIR", "torch.compile loads the kernels cached there, or compiles the sources there in"),
    ("TRITON_CACHE_DIR", "Triton loads the compiled kernels cached there"),
    ("TRITON_*_PATH", "Triton runs the compiler (ptxas) or links the library it names into kernels"),
    ("PERL5LIB", "Perl loads its modules from these folders first"),
    ("PERLLIB", "Perl loads its modules from these folders first"),
    ("PERL5OPT", "Perl takes these as command-line options: -M loads a module"),
    ("CUDA_VISIBLE_DEVICES", "the hostfile's slots (or --include HOST:0,1) choose each node's devices; "
                             "from the file it re-indexes every node's slots without the plan knowing"),
    ("SDTRAIN_INJECT_*", "a drill: it makes the run fail on purpose"),
)


def guarded_reason(name: str) -> str | None:
    """Why `name` is guarded (the first row that matches), or None for an ordinary variable."""
    return next((why for pattern, why in GUARDED if fnmatchcase(name, pattern)), None)

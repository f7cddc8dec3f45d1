"""matplotlib, or a one-line message saying how to get it (exit 2)."""

from __future__ import annotations

from sdtrain.errors import UserInputError

INSTALL_HINT = "plots need matplotlib: pip install 'sdtrain[plot]'"


def figure_class():
    """matplotlib's Figure on the Agg backend: files only, never a window (and no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def save(figure, out: str) -> None:
    try:
        figure.savefig(out, dpi=110)
    except OSError as exc:
        raise UserInputError(f"cannot write {out}: {exc.strerror}") from None
    except ValueError as exc:  # an extension matplotlib has no writer for
        raise UserInputError(f"cannot write {out}: {exc}") from None

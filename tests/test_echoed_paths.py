"""Paths a user hands `sdtrain checkpoint verify` and `sdtrain export` come back in messages
with control characters escaped: an ESC in a name is shown as `\\x1b`, never run by the terminal."""

from conftest import sdtrain

CLEAR = "\x1b[2J"


def test_checkpoint_verify_and_export_echo_paths_escaped(tmp_path):
    missing, folder = tmp_path / f"{CLEAR}q", tmp_path / f"{CLEAR}dir"
    folder.mkdir()  # exists, but is no checkpoint
    runs = [sdtrain("checkpoint", "verify", missing), sdtrain("checkpoint", "verify", folder),
            sdtrain("export", folder, tmp_path / "o.safetensors"), sdtrain("export", missing, tmp_path / f"o{CLEAR}.bin")]
    for result in runs:
        assert result.returncode == 2, result.args
        assert "\x1b" not in result.stdout + result.stderr and "\\x1b[2J" in result.stderr, result.stderr

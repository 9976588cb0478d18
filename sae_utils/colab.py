"""What a notebook does differently on Google Colab: a run short enough for one session, outputs on Google Drive.

    steps = default_steps(paper=10_000, colab=COLAB_STEPS)     # 1,000 on Colab, the paper's 10,000 elsewhere
    output_dir = persistent_output_dir("outputs/05_multi_concept")  # on Colab: /content/drive/MyDrive/sepen-course/...

A free Colab session ends after a few hours, or sooner when the browser is idle, and takes its disk with it. A run
that writes its checkpoints to Google Drive survives the disconnect: run the notebook again and `Finetuner` resumes
from the last checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

COLAB_STEPS = 1_000  # notebook 05 on a free T4: estimate 30 to 90 minutes (2 to 5 s a step), one session's worth
DRIVE = Path("/content/drive")
DRIVE_FOLDER = DRIVE / "MyDrive" / "sepen-course"


def on_colab() -> bool:
    return "google.colab" in sys.modules


def default_steps(paper: int, colab: int = COLAB_STEPS) -> int:
    """The paper's step count, or on Colab a short run that fits a session (resume adds more later)."""
    return colab if on_colab() else paper


def persistent_output_dir(output_dir: str, use_drive: bool = True) -> str:
    """On Colab (with use_drive), mount Google Drive and put the folder there, under MyDrive/sepen-course, so that
    checkpoints outlive the session; elsewhere, or for a folder already on Drive, the folder as given."""
    if not (use_drive and on_colab()) or str(output_dir).startswith(str(DRIVE)):
        return str(output_dir)
    from google.colab import drive  # noqa: PLC0415 - only on Colab

    if not (DRIVE / "MyDrive").exists():
        drive.mount(str(DRIVE))
    return str(DRIVE_FOLDER / Path(output_dir).name)

"""On Colab, notebook 05 defaults to a run that fits a session and keeps its outputs on Google Drive."""
import sys
import types

from sae_utils import colab


def test_elsewhere_the_paper_steps_and_the_folder_as_given(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert colab.default_steps(10_000) == 10_000
    assert colab.persistent_output_dir("outputs/05_multi_concept") == "outputs/05_multi_concept"


def test_on_colab_a_short_run_on_drive(monkeypatch, tmp_path):
    mounted = []
    drive = types.SimpleNamespace(mount=lambda path: mounted.append(path))
    google = types.ModuleType("google")
    module = types.ModuleType("google.colab")
    module.drive = drive
    google.colab = module
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", module)
    monkeypatch.setattr(colab, "DRIVE", tmp_path / "drive")
    monkeypatch.setattr(colab, "DRIVE_FOLDER", tmp_path / "drive" / "MyDrive" / "sepen-course")
    assert colab.default_steps(10_000) == colab.COLAB_STEPS < 10_000
    folder = colab.persistent_output_dir("outputs/05_multi_concept")
    assert mounted == [str(tmp_path / "drive")]
    assert folder == str(tmp_path / "drive" / "MyDrive" / "sepen-course" / "05_multi_concept")
    # a folder already on Drive, or use_drive=False, is left as given
    assert colab.persistent_output_dir(folder) == folder
    assert colab.persistent_output_dir("outputs/x", use_drive=False) == "outputs/x"

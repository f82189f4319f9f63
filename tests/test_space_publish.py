"""Publishing the Space with today's tools: a push through huggingface_hub's API (network replaced
here), the `hf upload` command (the CLI since huggingface_hub 1.0) printed, refusals in one line; a
push without a token refused before any network call (the real library, the network unreachable);
a Space built where Gradio is not installed (the notebook's environment)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.space import APP_README, main, push, sdk_version, upload_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def built(tmp_path):
    out = tmp_path / "space_out"
    out.mkdir()
    (out / "app.py").write_text("print('app')\n")
    (out / "README.md").write_text("---\nsdk: gradio\n---\n")
    return out


class FakeApi:
    calls: list = []
    refuse: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if FakeApi.refuse:
            raise FakeApi.refuse
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/spaces/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # a token is found: the (fake) Hub is asked
    FakeApi.calls, FakeApi.refuse = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_creates_a_gradio_space_and_uploads_the_folder(fake_hub, built):
    assert push(built, "someone/yolo-demo") == "https://huggingface.co/spaces/someone/yolo-demo"
    (kind, repo, create), (_, _, upload) = fake_hub.calls
    assert create["repo_type"] == "space" and create["space_sdk"] == "gradio" and create["exist_ok"]
    assert upload["folder_path"] == built and upload["repo_type"] == "space"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def push_offline(built: Path, tmp_path: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m helpers.space push` with the real huggingface_hub, no token in the environment, an
    empty HF_HOME, the Hub at a closed local port, and every socket connection recorded in a file."""
    attempts = tmp_path / "connections"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import socket
        _connect = socket.socket.connect
        def connect(self, address):
            with open({str(attempts)!r}, "a") as f:
                f.write(repr(address) + "\\n")
            return _connect(self, address)
        socket.socket.connect = connect
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]),
               **env_extra)
    done = subprocess.run([sys.executable, "-m", "helpers.space", "push", str(built), "--space", "someone/yolo-demo"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return done, attempts


def test_push_without_any_token_is_refused_in_one_line_before_any_network_call(built, tmp_path):
    done, attempts = push_offline(built, tmp_path)
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err, err
    assert "hf auth login" in err and "HF_TOKEN" in err and "no Hugging Face token" in err
    assert not attempts.exists(), attempts.read_text()  # no connection was even tried


def test_with_a_token_the_same_push_tries_the_network_and_offline_says_so_in_one_line(built, tmp_path):
    """What makes the test above able to fail: the recorder sees the library's connections."""
    done, attempts = push_offline(built, tmp_path, HF_TOKEN="hf_not_a_real_token")
    assert done.returncode != 0 and attempts.exists() and "127.0.0.1" in attempts.read_text()
    err = done.stderr.strip()  # and offline, that is one line too
    assert done.returncode == 2 and "\n" not in err and "could not reach the Hugging Face Hub" in err, err


def test_a_space_is_built_where_gradio_is_not_installed(tmp_path):
    """The notebook installs requirements.txt only: `build` writes the Space without importing Gradio,
    with the Gradio version app/README.md names (the one the app's tests run)."""
    import torch

    from helpers.config import Config
    from helpers.export import write_bundle
    from helpers.model import YOLOv3

    cfg = Config()
    cfg.model.width, cfg.data.image_size = 0.125, 64
    bundle = write_bundle(YOLOv3(num_classes=20, width=0.125).eval(), cfg, tmp_path / "bundle")
    del torch
    script = ("import sys, runpy; sys.modules['gradio'] = None  # import gradio raises ImportError\n"
              f"sys.argv = ['space', 'build', {str(tmp_path / 'space')!r}, '--bundle', {str(bundle)!r}]\n"
              "runpy.run_module('helpers.space', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    readme = (tmp_path / "space" / "README.md").read_text()
    assert f"sdk_version: {sdk_version()}" in readme and sdk_version() in APP_README.read_text()
    assert (tmp_path / "space" / "bundle" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_push_refuses_a_folder_that_was_not_built(fake_hub, tmp_path, capsys):
    assert main(["push", str(tmp_path), "--space", "someone/yolo-demo"]) == 2
    assert "helpers.space build" in capsys.readouterr().err
    assert fake_hub.calls == []


def test_the_printed_cli_command_is_hf_upload_not_the_removed_huggingface_cli():
    command = upload_command("space_out", "me/demo")
    assert command.endswith("hf upload me/demo space_out . --repo-type space")
    assert "hf repos create me/demo --repo-type space --space-sdk gradio" in command

"""Publishing the Space with today's tools: a push through huggingface_hub's API (network replaced
here), the `hf upload` command (the CLI since huggingface_hub 1.0) printed, refusals in one line."""
from __future__ import annotations

import pytest

from helpers.space import main, push, upload_command


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

    FakeApi.calls, FakeApi.refuse = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_creates_a_gradio_space_and_uploads_the_folder(fake_hub, built):
    assert push(built, "someone/yolo-demo") == "https://huggingface.co/spaces/someone/yolo-demo"
    (kind, repo, create), (_, _, upload) = fake_hub.calls
    assert create["repo_type"] == "space" and create["space_sdk"] == "gradio" and create["exist_ok"]
    assert upload["folder_path"] == built and upload["repo_type"] == "space"


def test_push_without_a_token_says_how_to_log_in(fake_hub, built, capsys):
    from huggingface_hub.errors import LocalTokenNotFoundError

    fake_hub.refuse = LocalTokenNotFoundError("Token is required")
    assert main(["push", str(built), "--space", "someone/yolo-demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hf auth login" in err and "\n" not in err


def test_push_refuses_a_folder_that_was_not_built(fake_hub, tmp_path, capsys):
    assert main(["push", str(tmp_path), "--space", "someone/yolo-demo"]) == 2
    assert "helpers.space build" in capsys.readouterr().err
    assert fake_hub.calls == []


def test_the_printed_cli_command_is_hf_upload_not_the_removed_huggingface_cli():
    command = upload_command("space_out", "me/demo")
    assert command.endswith("hf upload me/demo space_out . --repo-type space")
    assert "hf repos create me/demo --repo-type space --space-sdk gradio" in command

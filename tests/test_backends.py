"""Archive backends: the scheme table in casruns/backends.py, kept honest against pyproject's
extras and the spec, and how plugin backends are chosen and isolated (in process; the
end-to-end test through the CLI is test_plugins.py's test_hook_casruns_archive_backends)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from casruns import backends
from casruns.archive import FsspecRemote, LocalRemote, Remote
from casruns.backends import Backend, open_archive
from casruns.errors import PluginError
from casruns.plugins import Plugins, hookimpl

ROOT = Path(__file__).resolve().parent.parent


def never():
    raise AssertionError("must not be called for this URL")


def with_plugin(entries) -> Plugins:
    class Plugin:
        @hookimpl
        def casruns_archive_backends(self):
            return entries

    plugins = Plugins()
    plugins.register(Plugin(), "myarchive", "module")
    return plugins


def test_every_extra_a_backend_names_is_declared_in_pyproject():
    """The error for a missing backend says ``pip install 'casruns[<extra>]'``; that extra must exist."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {b.extra for b in [*backends.BACKENDS.values(), backends.FSSPEC] if b.extra}
    assert named - set(declared) == set()


def test_every_builtin_scheme_is_in_the_archives_section_of_the_spec():
    spec = (ROOT / "spec" / "format.md").read_text()
    section = spec[spec.index("## Archives") :]
    bullet = section[section.index("- **Backends.**") : section.index("- **Marker.**")]
    assert [s for s in backends.BACKENDS if f"`{s}`" not in bullet and f"`{s}://`" not in bullet] == []


@pytest.mark.parametrize("url", ["{d}", "file://{d}", "FILE://{d}"])
def test_a_path_or_file_url_is_a_local_directory_without_config_or_plugins(tmp_path, url):
    remote = open_archive(url.format(d=tmp_path), config=never, plugins=never)
    assert isinstance(remote, LocalRemote) and remote.root == str(tmp_path)


def test_s3_takes_its_endpoint_and_region_from_the_archive_config():
    pytest.importorskip("s3fs")
    remote = open_archive("s3://bucket/p", config=lambda: {"endpoint_url": "http://127.0.0.1:9", "region": "eu-west-1"}, plugins=never)
    assert isinstance(remote, FsspecRemote)
    assert remote.fs.endpoint_url == "http://127.0.0.1:9" and remote.fs.client_kwargs == {"region_name": "eu-west-1"}


def test_a_plugin_never_replaces_a_builtin_scheme(tmp_path):
    hijack = Backend(lambda url, config: never())
    plugins = with_plugin({"file": hijack, "s3": hijack})
    assert isinstance(open_archive(f"file://{tmp_path}", config=dict, plugins=lambda: plugins), LocalRemote)
    assert backends.plugin_backends(plugins)["s3"][0] == "myarchive"  # offered, and ignored:
    pytest.importorskip("s3fs")
    assert isinstance(open_archive("s3://bucket/p", config=dict, plugins=never), FsspecRemote)


def test_a_plugin_scheme_is_opened_with_the_archive_config(tmp_path):
    seen = {}

    def open_box(url, config):
        seen.update(url=url, config=config)
        return LocalRemote(str(tmp_path))

    plugins = with_plugin({"Box": Backend(open_box)})
    remote = open_archive("box://x/y", config=lambda: {"region": "r"}, plugins=lambda: plugins)
    assert isinstance(remote, LocalRemote) and seen == {"url": "box://x/y", "config": {"region": "r"}}


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"box": Backend(lambda url, config: 1 / 0)}, "myarchive failed to open box:// archive: ZeroDivisionError"),
        ({"box": Backend(lambda url, config: object())}, "returned object, not a casruns.archive.Remote"),
        ({"box": (lambda url, config: None)}, "must return {scheme: casruns.backends.Backend}"),
        (["box"], "must return {scheme: casruns.backends.Backend}"),
    ],
)
def test_a_broken_plugin_backend_is_a_plugin_error_naming_plugin_and_hook(entries, message):
    with pytest.raises(PluginError, match=message.replace("(", r"\(").replace("{", r"\{")) as info:
        open_archive("box://x", config=dict, plugins=lambda: with_plugin(entries))
    assert info.value.details["plugin"] == "myarchive" and info.value.details["hook"] == "casruns_archive_backends"


def test_an_unknown_scheme_without_a_plugin_goes_to_fsspec():
    remote = open_archive("memory://casruns-test-archive", config=dict, plugins=Plugins)
    assert isinstance(remote, FsspecRemote) and isinstance(remote, Remote)

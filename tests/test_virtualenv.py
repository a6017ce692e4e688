"""The virtualenv engine with real uv and virtualenv, installing only from local wheels."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import psutil
import pytest

from pytest_isolation import (
    CommandFailed,
    EnvironmentCreationError,
    IsolatedEnvironment,
    IsolationManager,
    Ledger,
)
from pytest_isolation.engines.virtualenv import VirtualenvEnvironment
from tests.conftest import Wheelhouse, build_wheel, make_project, other_interpreter, wait_for

META = ".pytest-isolation-template.json"
VERSION_CODE = "import tinypkg; print(tinypkg.VERSION)"


# --- helpers ----------------------------------------------------------------------------------


class Local(TypedDict):
    find_links: list[str]
    offline: bool


def local(wheels: Path) -> Local:
    """Options that install from the folder ``wheels`` only, never from the network."""
    return {"find_links": [str(wheels)], "offline": True}


def private_wheels(wheelhouse: Wheelhouse, tmp_path: Path) -> Path:
    """A copy of the wheelhouse at a new path: its spec is new, so it gets a new template."""
    target = tmp_path / "wheels"
    shutil.copytree(wheelhouse.path, target)
    return target.resolve()


def venv_of(env: IsolatedEnvironment) -> VirtualenvEnvironment:
    assert isinstance(env, VirtualenvEnvironment), env
    return env


def version_in(env: IsolatedEnvironment, module: str = "tinypkg") -> str:
    code = f"import {module}; print({module}.VERSION)"
    return env.run(["python", "-c", code]).check().stdout.strip()


def template_root() -> Path:
    return Path(os.environ["PYTEST_ISOLATION_CACHE_DIR"]) / "venv-templates"


def templates_for(
    find_links: Path,
    packages: Sequence[str],
    *,
    installer: str = "uv",
    seed: bool = False,
    python: str = sys.executable,
) -> list[Path]:
    """The current templates of the cache (those their links point at) built for exactly this
    spec."""
    found = []
    links = [p for p in template_root().iterdir() if p.is_symlink()]
    for meta in sorted(link.resolve() / META for link in links):
        if not meta.exists():
            continue
        key = json.loads(meta.read_text("utf-8"))["key"]
        if (
            [entry[0] for entry in key["find_links"]] == [str(find_links.resolve())]
            and key["packages"] == sorted(packages)
            and key["requirements"] is None
            and key["installer"] == installer
            and key["seed"] == seed
            and key["python"][0] == str(Path(python).resolve())
        ):
            found.append(meta.parent)
    return found


def half_built_templates() -> list[Path]:
    """Template folders without their metadata: builds that failed and were not removed."""
    if not template_root().is_dir():
        return []
    return [
        p
        for p in template_root().iterdir()
        if p.is_dir() and not p.is_symlink() and not (p / META).exists()
    ]


def linkable_files(template: Path) -> list[str]:
    """The template's files a clone may share: non-empty regular files not rewritten."""
    rewritten = set(json.loads((template / META).read_text("utf-8"))["rewrite"])
    candidates = [template / "pyvenv.cfg", *template.glob("lib/python*/site-packages/**/*")]
    return [
        path.relative_to(template).as_posix()
        for path in candidates
        if path.is_file()
        and not path.is_symlink()
        and path.stat().st_size > 0
        and path.relative_to(template).as_posix() not in rewritten
    ]


def reflinks_work(directory: Path) -> bool:
    """Whether ``directory``'s filesystem can reflink, in which case clones get new inodes."""
    import fcntl

    source, target = directory / "reflink-probe", directory / "reflink-probe-copy"
    source.write_bytes(b"probe")
    try:
        with source.open("rb") as src, target.open("xb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())  # FICLONE
    except OSError:
        return False
    else:
        return True
    finally:
        source.unlink()
        target.unlink(missing_ok=True)


def folders_of(session_id: str) -> list[Path]:
    """The run's environment folders in the temp directory (other runs may share it)."""
    return sorted(Path(tempfile.gettempdir()).glob(f"pytest-isolation-{session_id[:8]}-*"))


#: Lets a pytester run tell its own folders from those of other runs sharing the temp dir.
NOTE_SESSION_ID = """
import pytest

@pytest.fixture(autouse=True, scope="session")
def _note_session_id(isolation_manager):
    with open("session-id", "w") as note:
        note.write(isolation_manager.session_id)
"""


# --- using it as users do ---------------------------------------------------------------------


def test_marker_gives_a_venv_with_the_packages_and_none_of_the_hosts(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """The marker makes a venv: packages import, python/sys.prefix/VIRTUAL_ENV are the venv's."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("virtualenv", packages=["tinypkg==1.0"], {wheelhouse.options()})
        def test_it(isolated_env):
            venv = isolated_env.venv
            assert isolated_env.engine == "virtualenv"
            assert isolated_env.python.is_relative_to(venv) and isolated_env.python.is_file()
            code = (
                "import os, sys, tinypkg; print(tinypkg.VERSION); print(sys.prefix); "
                "print(os.environ['VIRTUAL_ENV']); print(sys.executable)"
            )
            out = isolated_env.run(["python", "-c", code]).check().stdout.splitlines()
            assert out == ["1.0", str(venv), str(venv), str(isolated_env.python)]
            host = isolated_env.run(["python", "-c", "import pytest"])
            assert host.returncode == 1, host
            assert "No module named 'pytest'" in host.stderr
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 environment(s) (virtualenv: 1)*"])


def test_engine_and_options_from_the_command_line(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """--isolation=virtualenv and --isolation-option set the engine and its defaults."""
    pytester.makepyfile(
        """
        import pytest

        VERSION = "import tinypkg; print(tinypkg.VERSION)"

        def test_defaults(isolated_env):
            assert isolated_env.engine == "virtualenv"
            assert isolated_env.run(["python", "-c", VERSION]).check().stdout == "1.0\\n"

        @pytest.mark.isolated(packages=["tinypkg==2.0"])
        def test_marker_wins(isolated_env):
            assert isolated_env.engine == "virtualenv"
            assert isolated_env.run(["python", "-c", VERSION]).check().stdout == "2.0\\n"
        """
    )
    result = pytester.runpytest(
        "--isolation=virtualenv",
        "--isolation-option",
        f"virtualenv.find_links=['{wheelhouse.path}']",
        "--isolation-option",
        "virtualenv.offline=true",
        "--isolation-option",
        "virtualenv.packages=[tinypkg==1.0]",
    )
    result.assert_outcomes(passed=2)


def test_engine_and_options_from_the_ini_file(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """Ini `isolation` and `isolation_options` work, a relative find_links taken from rootdir."""
    shutil.copytree(wheelhouse.path, pytester.path / "wheels")
    pytester.makeini(
        """
        [pytest]
        isolation = virtualenv
        isolation_options =
            virtualenv.find_links=[wheels]
            virtualenv.offline=true
            virtualenv.packages=[tinypkg==1.0]
        """
    )
    pytester.mkdir("sub")
    pytester.path.joinpath("sub", "test_ini.py").write_text(
        "def test_it(isolated_env):\n"
        "    assert isolated_env.engine == 'virtualenv'\n"
        f"    code = {VERSION_CODE!r}\n"
        "    assert isolated_env.run(['python', '-c', code]).check().stdout == '1.0\\n'\n"
    )
    result = pytester.runpytest("sub")
    result.assert_outcomes(passed=1)


# --- creators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("creator", ["uv", "virtualenv"])
def test_creator_builds_a_working_environment(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse, creator: str
) -> None:
    """creator="uv" and creator="virtualenv" both give an environment whose packages import."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated(
            "virtualenv", creator={creator!r}, packages=["tinypkg==1.0"], {wheelhouse.options()}
        )
        def test_it(isolated_env):
            assert isolated_env.installer.name == {creator!r}
            # virtualenv installs with pip, so pip is in; uv leaves it out unless seeded
            pip = isolated_env.run(["python", "-m", "pip", "--version"])
            assert pip.ok is {creator == "virtualenv"}, pip
            result = isolated_env.run(["python", "-c", {VERSION_CODE!r}])
            assert result.stdout == "1.0\\n", result.stderr
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_virtualenv_creator_without_template(wheelhouse: Wheelhouse) -> None:
    """creator="virtualenv" with template=False builds directly and its packages import."""
    with IsolationManager() as manager:
        env = venv_of(
            manager.create(
                "virtualenv",
                creator="virtualenv",
                template=False,
                packages=["tinypkg==1.0"],
                **local(wheelhouse.path),
            )
        )
        assert env.installer.name == "virtualenv"
        assert version_in(env) == "1.0"


def test_seed_puts_pip_into_a_uv_environment(wheelhouse: Wheelhouse) -> None:
    """seed=True gives a uv environment a pip that installs into it; without it there is
    none."""
    with IsolationManager() as manager:
        plain = manager.create("virtualenv", creator="uv", **local(wheelhouse.path))
        seeded = venv_of(
            manager.create("virtualenv", creator="uv", seed=True, **local(wheelhouse.path))
        )
        assert not plain.run(["python", "-m", "pip", "--version"]).ok
        pip = seeded.run(["python", "-m", "pip", "--version"]).check()
        # the pip script's shebang named the template: it runs only if the clone rewrote it
        assert seeded.run(["pip", "--version"]).check().stdout == pip.stdout
        wheels = str(wheelhouse.path)
        seeded.run(["pip", "install", "-q", "--no-index", "-f", wheels, "tinycli"]).check()
        assert seeded.run(["tinycli"]).check().stdout == "0.1\n"
        assert list(seeded.venv.glob("lib/python*/site-packages/tinycli/__init__.py"))
        assert seeded.template is not None
        assert not list(seeded.template.glob("lib/python*/site-packages/tinycli"))


# --- templates --------------------------------------------------------------------------------


def test_an_environment_layers_the_templates_site_packages_beneath_its_own(
    wheelhouse: Wheelhouse,
) -> None:
    """By default an environment's site-packages holds only a .pth file that puts the
    template's after it on sys.path: constant cost, and what it installs comes first."""
    with IsolationManager() as manager:
        env = venv_of(
            manager.create("virtualenv", packages=["tinypkg==1.0"], **local(wheelhouse.path))
        )
        (template,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
        assert env.template == template
        (own,) = env.venv.glob("lib/python*/site-packages")
        assert [p.name for p in own.iterdir()] == ["_pytest_isolation_template.pth"]
        (shared,) = template.glob("lib/python*/site-packages")
        code = "import sys, tinypkg; print(tinypkg.__file__); print('\\n'.join(sys.path))"
        out = env.run(["python", "-c", code]).check().stdout.splitlines()
        assert out[0] == str(shared / "tinypkg" / "__init__.py")
        assert out.index(str(own)) < out.index(str(shared))
        env.install(["tinypkg==2.0"])
        assert version_in(env) == "2.0"
        assert (own / "tinypkg" / "__init__.py").is_file()
        assert "VERSION = '1.0'" in (shared / "tinypkg" / "__init__.py").read_text()


def test_hardlink_mode_clones_every_file_sharing_the_templates_data(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """With link="hardlink" an environment is a clone whose files are the template's (same
    inode, or a reflink's new one)."""
    with IsolationManager() as manager:
        options: dict[str, Any] = {"packages": ["tinypkg==1.0"], "link": "hardlink"}
        first = venv_of(manager.create("virtualenv", **options, **local(wheelhouse.path)))
        second = venv_of(manager.create("virtualenv", **options, **local(wheelhouse.path)))
        (template,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
        assert template.parent == template_root()
        assert first.venv != second.venv
        assert not (second.venv / META).exists()
        files = linkable_files(template)
        # RECORD and pyvenv.cfg are written per install, so sharing them means cloning, not
        # uv hard-linking both from its own cache
        assert "pyvenv.cfg" in files
        assert any(name.endswith("dist-info/RECORD") for name in files)
        # a reflink is a new inode; tmp_path is beside the cache, on the same filesystem
        reflinked = reflinks_work(tmp_path)
        for name in files:
            assert os.path.samefile(template / name, second.venv / name) is not reflinked, name
            assert (template / name).read_bytes() == (second.venv / name).read_bytes()
        assert version_in(second) == "1.0"


def test_copy_link_mode_shares_no_file_with_the_template(wheelhouse: Wheelhouse) -> None:
    """With link="copy" no file of the clone is the template's file."""
    with IsolationManager() as manager:
        env = venv_of(
            manager.create(
                "virtualenv", packages=["tinypkg==1.0"], link="copy", **local(wheelhouse.path)
            )
        )
        (template,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
        files = linkable_files(template)
        assert files
        for name in files:
            assert not os.path.samefile(template / name, env.venv / name), name
            assert (template / name).read_bytes() == (env.venv / name).read_bytes()
        assert version_in(env) == "1.0"


def test_clones_are_independent_of_each_other_and_of_the_template(
    wheelhouse: Wheelhouse,
) -> None:
    """Installing into one clone changes neither the other clone nor the template."""
    with IsolationManager() as manager:
        one = venv_of(
            manager.create("virtualenv", packages=["tinypkg==1.0"], **local(wheelhouse.path))
        )
        two = venv_of(
            manager.create("virtualenv", packages=["tinypkg==1.0"], **local(wheelhouse.path))
        )
        one.install(["tinypkg==2.0", "tinycli"])
        assert version_in(one) == "2.0"
        assert one.run(["tinycli"]).check().stdout == "0.1\n"
        assert version_in(two) == "1.0"
        assert not (two.venv / "bin" / "tinycli").exists()
        (template,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
        (source,) = template.glob("lib/python*/site-packages/tinypkg/__init__.py")
        assert "VERSION = '1.0'" in source.read_text()


def test_console_script_of_a_clone_runs_with_the_clones_python(wheelhouse: Wheelhouse) -> None:
    """A clone's console script runs, its shebang naming the clone's python, not the template's."""
    with IsolationManager() as manager:
        manager.create("virtualenv", packages=["tinycli"], **local(wheelhouse.path))
        env = venv_of(manager.create("virtualenv", packages=["tinycli"], **local(wheelhouse.path)))
        (template,) = templates_for(wheelhouse.path, ["tinycli"])
        script = (env.venv / "bin" / "tinycli").read_text()
        assert script.splitlines()[0] == f"#!{env.python}"
        assert str(template) not in script
        assert (template / "bin" / "tinycli").read_text().startswith(f"#!{template}/bin/python")
        assert env.run(["tinycli"]).check().stdout == "0.1\n"
        found = env.run(["sh", "-c", "command -v tinycli"]).check().stdout.strip()
        assert found == str(env.venv / "bin" / "tinycli")


def test_changed_packages_build_another_template(wheelhouse: Wheelhouse) -> None:
    """A spec with other packages gets its own template with its own content."""
    with IsolationManager() as manager:
        old = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(wheelhouse.path))
        new = manager.create(
            "virtualenv", packages=["tinypkg==2.0", "tinycli"], **local(wheelhouse.path)
        )
        (old_template,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
        (new_template,) = templates_for(wheelhouse.path, ["tinypkg==2.0", "tinycli"])
        assert old_template != new_template
        assert version_in(old) == "1.0"
        assert version_in(new) == "2.0"
        assert not (old_template / "bin" / "tinycli").exists()
        assert (new_template / "bin" / "tinycli").exists()


def test_a_new_wheel_in_find_links_builds_a_new_template(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """Adding a wheel to a find_links folder makes a new template that installs it."""
    links = private_wheels(wheelhouse, tmp_path)
    with IsolationManager() as manager:
        before = manager.create("virtualenv", packages=["tinypkg"], **local(links))
        assert version_in(before) == "2.0"
        build_wheel(links, "tinypkg", "3.0")
        after = manager.create("virtualenv", packages=["tinypkg"], **local(links))
        assert version_in(after) == "3.0"
        assert len(templates_for(links, ["tinypkg"])) == 2


def test_installer_settings_of_the_host_shape_the_template(
    wheelhouse: Wheelhouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UV_*/PIP_* variables change what the installers make, so they are part of the key;
    bytecode compiled into a template stays valid in its clones."""
    links = private_wheels(wheelhouse, tmp_path)
    with IsolationManager() as manager:
        plain = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
        monkeypatch.setenv("UV_COMPILE_BYTECODE", "1")
        compiled = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
        again = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
        assert len(templates_for(links, ["tinypkg==1.0"])) == 2
        template = venv_of(again).template
        assert template is not None
        # before anything imported it (an import could write bytecode there too)
        assert list(template.glob("lib/python3*/site-packages/tinypkg/__pycache__/*.pyc"))
        assert version_in(plain) == version_in(compiled) == version_in(again) == "1.0"


def test_template_false_builds_the_environment_directly(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """template=False builds in place: no template is made and no file is shared with one."""
    links = private_wheels(wheelhouse, tmp_path)
    with IsolationManager() as manager:
        env = venv_of(
            manager.create("virtualenv", packages=["tinypkg==1.0"], template=False, **local(links))
        )
        assert version_in(env) == "1.0"
        assert templates_for(links, ["tinypkg==1.0"]) == []
        assert (env.venv / "pyvenv.cfg").stat().st_nlink == 1
        assert not (env.venv / META).exists()


# --- install() --------------------------------------------------------------------------------


def test_install_after_creation_upgrades_a_package(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """isolated_env.install() installs with the spec's find_links; an upgrade is visible at once."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("virtualenv", packages=["tinypkg==1.0"], {wheelhouse.options()})
        def test_it(isolated_env):
            code = {VERSION_CODE!r}
            assert isolated_env.run(["python", "-c", code]).check().stdout == "1.0\\n"
            assert isolated_env.install(["tinypkg==2.0"]).ok
            assert isolated_env.run(["python", "-c", code]).check().stdout == "2.0\\n"
            assert isolated_env.install("tinycli").ok
            assert isolated_env.run(["tinycli"]).check().stdout == "0.1\\n"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_install_of_a_missing_package_raises_command_failed(wheelhouse: Wheelhouse) -> None:
    """install() of a package that cannot be found raises CommandFailed carrying uv's output."""
    with IsolationManager() as manager:
        env = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(wheelhouse.path))
        with pytest.raises(CommandFailed) as failure:
            env.install(["nosuchpkg"])
        assert failure.value.returncode != 0
        assert "nosuchpkg was not found" in str(failure.value)
        assert version_in(env) == "1.0"


# --- python= ----------------------------------------------------------------------------------


def test_python_path_to_another_interpreter_is_used(wheelhouse: Wheelhouse) -> None:
    """python=<path> makes the environment with that interpreter."""
    other = other_interpreter()
    assert other is not None, "no second Python interpreter on this machine (CI has several)"
    show = "import sys; print(sys.version); print(sys.base_prefix); print(sys.prefix)"
    direct = subprocess.run(
        [str(other), "-c", show], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    with IsolationManager() as manager:
        env = venv_of(
            manager.create(
                "virtualenv", python=str(other), packages=["tinypkg==1.0"], **local(wheelhouse.path)
            )
        )
        inside = env.run(["python", "-c", show]).check().stdout.splitlines()
        assert inside == [direct[0], direct[1], str(env.venv)]
        assert version_in(env) == "1.0"


def test_python_version_of_the_running_interpreter_works(wheelhouse: Wheelhouse) -> None:
    """python="X.Y" (the running interpreter's version) finds an interpreter of that version."""
    wanted = "{}.{}".format(*sys.version_info[:2])
    with IsolationManager() as manager:
        env = manager.create(
            "virtualenv", python=wanted, packages=["tinypkg==1.0"], **local(wheelhouse.path)
        )
        show = "import sys; print('{}.{}'.format(*sys.version_info[:2]))"
        assert env.run(["python", "-c", show]).check().stdout.strip() == wanted
        assert version_in(env) == "1.0"


# --- mistakes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        pytest.param(
            'packages=["nosuchpkg"]',
            [
                "E *EnvironmentCreationError: virtualenv: installing nosuchpkg with uv failed*",
                "E *nosuchpkg was not found*",
            ],
            id="unresolvable-package",
        ),
        pytest.param(
            'python="3.99"',
            ["E *EnvironmentCreationError: virtualenv: python='3.99': no such interpreter found*"],
            id="unknown-python-version",
        ),
        pytest.param(
            'python="/nonexistent/python"',
            [
                "E *EnvironmentCreationError: virtualenv: python='/nonexistent/python': "
                "no executable interpreter at that path"
            ],
            id="missing-python-path",
        ),
        pytest.param(
            'requirements="missing.txt"',
            ["E *EnvironmentCreationError: virtualenv: requirements file */missing.txt not found"],
            id="missing-requirements-file",
        ),
    ],
)
def test_impossible_environment_errors_in_setup_and_leaves_nothing(
    pytester: pytest.Pytester,
    wheelhouse: Wheelhouse,
    isolation_state: Ledger,
    arguments: str,
    expected: list[str],
) -> None:
    """An environment that cannot be made errors the test in set-up, says why, leaves nothing."""
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("virtualenv", {arguments}, {wheelhouse.options()})
        def test_it():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_it*", *expected])
    assert isolation_state.records() == []
    assert folders_of((pytester.path / "session-id").read_text()) == []
    assert half_built_templates() == []


def test_failed_build_leaves_no_template_and_no_resources(
    wheelhouse: Wheelhouse, isolation_state: Ledger
) -> None:
    """A template build that fails raises EnvironmentCreationError and removes what it made."""
    with IsolationManager() as manager:
        with pytest.raises(EnvironmentCreationError) as failure:
            manager.create("virtualenv", packages=["nosuchpkg"], **local(wheelhouse.path))
        assert "nosuchpkg was not found" in failure.value.output
        assert isinstance(failure.value.__cause__, CommandFailed)
        # checked before the manager closes: the engine itself must clean up, not a later prune
        assert half_built_templates() == []
        assert isolation_state.records() == []
        assert folders_of(manager.session_id) == []
        assert manager.list() == []


def test_wrong_option_type_is_a_collection_error(pytester: pytest.Pytester) -> None:
    """packages=5 fails collection naming the test, the option and what is expected."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("virtualenv", packages=5)
        def test_it():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting*",
            "*test_wrong_option_type_is_a_collection_error.py::test_it: invalid value for option "
            "'packages' of engine 'virtualenv': expected a list of strings, got 5*",
        ]
    )


def test_unknown_option_is_a_collection_error_listing_the_allowed_ones(
    pytester: pytest.Pytester,
) -> None:
    """A misspelt option fails collection and lists the options the engine accepts."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("virtualenv", pakages=["tinypkg"])
        def test_it():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_it: engine 'virtualenv' does not accept option 'pakages'; allowed options: "
            "*find_links*packages*python*requirements*"
        ]
    )


# --- requirements= ----------------------------------------------------------------------------


def test_relative_requirements_and_find_links_are_taken_from_the_test_files_folder(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """requirements= and find_links= relative paths start at the test file's folder."""
    sub = pytester.mkdir("sub")
    shutil.copytree(wheelhouse.path, sub / "wheels")
    (sub / "requirements.txt").write_text("tinypkg==1.0\ntinycli\n")
    (sub / "test_requirements.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.isolated(\n"
        "    'virtualenv', requirements='requirements.txt', find_links=['wheels'], offline=True\n"
        ")\n"
        "def test_it(isolated_env):\n"
        f"    code = {VERSION_CODE!r}\n"
        "    assert isolated_env.run(['python', '-c', code]).check().stdout == '1.0\\n'\n"
        "    assert isolated_env.run(['tinycli']).check().stdout == '0.1\\n'\n"
    )
    # run from the rootdir, which has neither file: only the test's folder does
    result = pytester.runpytest("sub")
    result.assert_outcomes(passed=1)


def test_edited_requirements_file_builds_a_new_template(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """An environment follows the requirements file's content, not an older template of it."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tinypkg==1.0\n")
    with IsolationManager() as manager:
        before = manager.create(
            "virtualenv", requirements=str(requirements), **local(wheelhouse.path)
        )
        assert version_in(before) == "1.0"
        # same size, and possibly the same mtime: only the content tells them apart
        requirements.write_text("tinypkg==2.0\n")
        after = manager.create(
            "virtualenv", requirements=str(requirements), **local(wheelhouse.path)
        )
        assert version_in(after) == "2.0"


# --- scopes -----------------------------------------------------------------------------------


def test_module_scope_shares_one_environment_and_function_scope_does_not(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """scope="module" gives a module's tests one venv; a function-scoped test gets its own."""
    options = f'"virtualenv", packages=["tinypkg==1.0"], {wheelhouse.options()}'
    pytester.makepyfile(
        f"""
        import pytest

        pytestmark = pytest.mark.isolated({options}, scope="module")
        seen = []

        def note(env):
            seen.append((env.id, env.venv))
            with open("roots.txt", "a") as roots:
                roots.write(f"{{env.root}}\\n{{env.venv}}\\n")

        def test_first(isolated_env):
            note(isolated_env)
            isolated_env.write_file("mark", "first")

        def test_second(isolated_env):
            note(isolated_env)
            assert seen[0] == seen[1]
            assert isolated_env.read_file("mark") == b"first"

        @pytest.mark.isolated({options})
        def test_own(isolated_env):
            note(isolated_env)
            assert seen[2][0] != seen[0][0] and seen[2][1] != seen[0][1]
            assert not (isolated_env.path / "mark").exists()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*2 environment(s) (virtualenv: 2)*"])
    left = [p for p in (pytester.path / "roots.txt").read_text().split() if Path(p).exists()]
    assert left == []


def test_session_scope_shares_one_environment_across_modules(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """scope="session" gives the tests of every module the same venv, removed at the end."""
    marker = (
        f'pytestmark = pytest.mark.isolated("virtualenv", packages=["tinypkg==1.0"], '
        f'scope="session", {wheelhouse.options()})'
    )
    pytester.makepyfile(
        test_one=f"""
        import pytest

        {marker}

        def test_one(isolated_env):
            isolated_env.write_file("owner", isolated_env.id)
            with open("roots.txt", "w") as roots:
                roots.write(f"{{isolated_env.root}}\\n{{isolated_env.venv}}\\n")
        """,
        test_two=f"""
        import pytest

        {marker}

        def test_two(isolated_env):
            assert isolated_env.read_file("owner").decode() == isolated_env.id
            assert isolated_env.run(["python", "-c", {VERSION_CODE!r}]).check().stdout == "1.0\\n"
        """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*1 environment(s) (virtualenv: 1)*"])
    roots = (pytester.path / "roots.txt").read_text().split()
    assert len(roots) == 2
    assert [p for p in roots if Path(p).exists()] == []


# --- parallel runs ----------------------------------------------------------------------------


def test_xdist_workers_build_the_template_once(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """Under -n 2, tests of one new spec all pass and share a single template."""
    links = private_wheels(wheelhouse, tmp_path)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.isolated(
            "virtualenv", packages=["tinypkg==1.0"], find_links=[{str(links)!r}], offline=True
        )
        def test_it(isolated_env, n):
            result = isolated_env.run(["python", "-c", {VERSION_CODE!r}]).check()
            assert result.stdout == "1.0\\n"
        """
    )
    result = pytester.runpytest("-n", "2")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*2 workers [[]4 items[]]*", "*4 environment(s) (virtualenv: 4)*"])
    assert len(templates_for(links, ["tinypkg==1.0"])) == 1
    # a worker's progress reaches the controller's terminal once the build ended
    assert len(progress(result, "building template")) == 1


def test_two_managers_in_threads_create_the_same_new_spec_at_once(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """Two managers creating environments of one new spec at the same time both succeed."""
    links = private_wheels(wheelhouse, tmp_path)
    start = threading.Barrier(2)
    versions: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with IsolationManager() as manager:
                start.wait(timeout=30)
                env = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
                versions.append(version_in(env))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert versions == ["1.0", "1.0"]
    assert len(templates_for(links, ["tinypkg==1.0"])) == 1


# --- never stale: the project under test and every local input, by content --------------------

PROJECT_CODE = "def main():\n    print({word!r})\n"

#: Two tests of one spec that install the project holding them; each writes what it ran.
PROJECT_TESTS = """
import pytest

@pytest.mark.isolated("virtualenv", project=True, {options})
@pytest.mark.parametrize("n", range(2))
def test_project(isolated_env, n):
    out = isolated_env.run(["myproj"]).check().stdout
    with open("seen.txt", "a") as seen:
        seen.write(out)
"""


def project_suite(pytester: pytest.Pytester, wheelhouse: Wheelhouse, **options: str) -> Path:
    """The pytester folder as a project ``myproj`` (console script ``myproj`` printing
    "one", depending on tinypkg) with two tests that install it."""
    make_project(
        pytester.path,
        "myproj",
        code=PROJECT_CODE.format(word="one"),
        requires=["tinypkg"],
        scripts={"myproj": "myproj:main"},
    )
    extra = "".join(f", {name}={value}" for name, value in options.items())
    pytester.makepyfile(test_project=PROJECT_TESTS.format(options=wheelhouse.options() + extra))
    return pytester.path / "src" / "myproj" / "__init__.py"


def seen(pytester: pytest.Pytester) -> list[str]:
    """What the inner tests saw, then forgotten for the next run."""
    path = pytester.path / "seen.txt"
    lines = path.read_text().split()
    path.unlink()
    return lines


def progress(result: pytest.RunResult, what: str) -> list[str]:
    """The progress lines of finished steps whose text contains ``what``."""
    return [
        line
        for line in result.outlines
        if line.startswith("isolation: virtualenv: ") and what in line and ": done in " in line
    ]


def test_project_under_test_is_built_once_per_run_and_edits_are_seen_by_the_next_run(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """project=True installs the project holding the test, built once per run through PEP 517;
    an edit of its source (same size, same second) is in the next run's environments, and an
    unchanged project reuses its template."""
    source = project_suite(pytester, wheelhouse)
    first = pytester.runpytest()
    first.assert_outcomes(passed=2)
    assert seen(pytester) == ["one", "one"]
    assert len(progress(first, f"building {pytester.path} (uv build)")) == 1
    assert len(progress(first, "building template")) == 1

    source.write_text(PROJECT_CODE.format(word="two"))
    second = pytester.runpytest()
    second.assert_outcomes(passed=2)
    assert seen(pytester) == ["two", "two"]
    assert len(progress(second, "building template")) == 1

    third = pytester.runpytest()
    third.assert_outcomes(passed=2)
    assert seen(pytester) == ["two", "two"]
    assert len(progress(third, f"building {pytester.path} (uv build)")) == 1
    assert progress(third, "building template") == []  # same wheel content, same template


def test_editable_project_shows_edits_at_once_and_a_metadata_change_makes_a_new_template(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """editable=True installs the project's source folder itself: no build, an edit is seen by
    the next command; a change of its metadata (pyproject.toml) builds a new template."""
    source = project_suite(pytester, wheelhouse, editable="True")
    first = pytester.runpytest()
    first.assert_outcomes(passed=2)
    assert seen(pytester) == ["one", "one"]
    assert progress(first, "(uv build)") == []
    source.write_text(PROJECT_CODE.format(word="two"))
    second = pytester.runpytest()
    second.assert_outcomes(passed=2)
    assert seen(pytester) == ["two", "two"]
    assert progress(second, "building template") == []
    pyproject = pytester.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1"', 'version = "0.2"'))
    third = pytester.runpytest()
    third.assert_outcomes(passed=2)
    assert len(progress(third, "building template")) == 1


def test_local_project_folder_in_packages_is_taken_from_the_test_files_folder(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """A relative folder in packages= is a project next to the test file, built like
    project=; an edit is seen by the next run."""
    make_project(pytester.path / "lib", "mylib", code="WORD = 'one'\n")
    tests = pytester.mkdir("tests")
    (tests / "test_lib.py").write_text(
        "import pytest\n\n"
        f"@pytest.mark.isolated('virtualenv', packages=['../lib'], {wheelhouse.options()})\n"
        "def test_it(isolated_env):\n"
        "    code = 'import mylib; print(mylib.WORD)'\n"
        "    with open('words.txt', 'a') as words:\n"
        "        words.write(isolated_env.run(['python', '-c', code]).check().stdout)\n"
    )
    pytester.runpytest("tests").assert_outcomes(passed=1)
    (pytester.path / "lib" / "src" / "mylib" / "__init__.py").write_text("WORD = 'two'\n")
    pytester.runpytest("tests").assert_outcomes(passed=1)
    assert (pytester.path / "words.txt").read_text().split() == ["one", "two"]


def test_a_missing_local_package_path_is_a_collection_error(pytester: pytest.Pytester) -> None:
    """packages=['./nowhere'] fails collection naming the path it looked for."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("virtualenv", packages=["./nowhere"])
        def test_it():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*invalid value for option 'packages'*'./nowhere' does not exist (looked for */nowhere)*"]
    )


def test_project_true_outside_any_project_says_how_to_name_one(
    pytester: pytest.Pytester,
) -> None:
    """project=True where no folder up the tree is a project is a collection error with the fix."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("virtualenv", project=True)
        def test_it():
            pass
        """
    )
    if any((parent / "pyproject.toml").exists() for parent in pytester.path.parents):
        pytest.skip("a folder above the test's temporary folder holds a project")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no pyproject.toml, setup.py or setup.cfg in *project='path/*"])


@pytest.mark.parametrize("nesting", ["-r", "-c"])
def test_a_changed_pin_in_an_included_file_builds_a_new_template(
    wheelhouse: Wheelhouse, tmp_path: Path, nesting: str
) -> None:
    """requirements= follows -r and -c into the files they name: a new pin there is a new
    environment (same size, written within the same second)."""
    requirements = tmp_path / "requirements.txt"
    included = tmp_path / "pins" / "base.txt"
    included.parent.mkdir()
    if nesting == "-r":
        requirements.write_text("-r pins/base.txt\n")
    else:
        requirements.write_text("tinypkg\n--constraint pins/base.txt\n")
    included.write_text("tinypkg==1.0\n")
    with IsolationManager() as manager:
        before = manager.create(
            "virtualenv", requirements=str(requirements), **local(wheelhouse.path)
        )
        assert version_in(before) == "1.0"
        included.write_text("tinypkg==2.0\n")
        after = manager.create(
            "virtualenv", requirements=str(requirements), **local(wheelhouse.path)
        )
        assert version_in(after) == "2.0"


def test_a_missing_included_requirements_file_names_its_includer(
    wheelhouse: Wheelhouse, tmp_path: Path, isolation_state: Ledger
) -> None:
    """-r of a file that does not exist: an EnvironmentCreationError naming both files."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("-r missing.txt\n")
    with IsolationManager() as manager:
        with pytest.raises(EnvironmentCreationError) as failure:
            manager.create("virtualenv", requirements=str(requirements), **local(wheelhouse.path))
        message = str(failure.value)
        assert f"{tmp_path / 'missing.txt'} not found (included by {requirements})" in message
        assert isolation_state.records() == []


@pytest.mark.parametrize("where", ["packages", "find_links"])
def test_a_rebuilt_wheel_with_the_same_name_is_installed_anew(
    wheelhouse: Wheelhouse, tmp_path: Path, where: str
) -> None:
    """A local wheel rebuilt under the same file name (same name, version and size) is what the
    next environment gets, whether named in packages or found in find_links: uv's own cache
    keys wheels by file name, so the template installs a content-addressed copy."""
    links = tmp_path / "dist"
    links.mkdir()
    wheel = build_wheel(links, "tinypkg", "1.0", code="VERSION = 'first'\n")
    options: dict[str, Any] = {"find_links": [str(links)], "offline": True}
    options["packages"] = [str(wheel)] if where == "packages" else ["tinypkg"]
    with IsolationManager() as manager:
        assert version_in(manager.create("virtualenv", **options)) == "first"
        assert build_wheel(links, "tinypkg", "1.0", code="VERSION = 'again'\n") == wheel
        assert version_in(manager.create("virtualenv", **options)) == "again"
        assert version_in(manager.create("virtualenv", **options)) == "again"


def test_isolation_recreate_rebuilds_each_template_once_per_run(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse
) -> None:
    """--isolation-recreate builds every template the run uses anew, once, however many tests
    use it; the build it replaced is removed."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("virtualenv", packages=["tinypkg==1.0"], {wheelhouse.options()})
        @pytest.mark.parametrize("n", range(3))
        def test_it(isolated_env, n):
            assert isolated_env.run(["python", "-c", {VERSION_CODE!r}]).check().stdout == "1.0\\n"
        """
    )
    pytester.runpytest().assert_outcomes(passed=3)
    (template,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
    again = pytester.runpytest()
    again.assert_outcomes(passed=3)
    assert progress(again, "building template") == []
    recreated = pytester.runpytest("--isolation-recreate")
    recreated.assert_outcomes(passed=3)
    assert len(progress(recreated, "building template")) == 1
    (new,) = templates_for(wheelhouse.path, ["tinypkg==1.0"])
    assert new != template
    assert not template.exists()


def test_a_template_build_prints_when_it_starts_and_ends(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """A template build says what it builds when it starts and how long it took when it ends,
    through the terminal (not captured with the test's output)."""
    links = private_wheels(wheelhouse, tmp_path)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated(
            "virtualenv", packages=["tinypkg==1.0", "tinycli"], find_links=[{str(links)!r}],
            offline=True,
        )
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "isolation: virtualenv: building template * (tinypkg==1.0, tinycli; python *) ...",
            "isolation: virtualenv: building template * (tinypkg==1.0, tinycli; python *): "
            "done in *s",
        ]
    )
    pytester.runpytest("-qq").stdout.no_fnmatch_line("isolation: virtualenv: *")


# --- templates that vanish, builds that are killed ---------------------------------------------

#: Three tests of one spec; the middle one removes the template cache as another shell would.
REMOVED_IN_THE_MIDDLE = """
import os, shutil, subprocess, sys
import pytest

SPEC = pytest.mark.isolated("virtualenv", packages=["tinypkg==1.0"], {options})

@SPEC
def test_a(isolated_env):
    assert isolated_env.run(["python", "-c", "import tinypkg"]).ok

def test_b_removes_templates():
    {removal}

@SPEC
def test_c(isolated_env):
    assert isolated_env.run(["python", "-c", "import tinypkg"]).ok
"""


@pytest.mark.parametrize(
    "removal",
    [
        pytest.param(
            "out = subprocess.run([sys.executable, '-m', 'pytest_isolation', 'cleanup', "
            "'--templates'], capture_output=True, text=True, check=True).stdout\n"
            "    assert 'venv-templates' in out, out",
            id="cleanup-templates",
        ),
        pytest.param(
            "shutil.rmtree(os.path.join(os.environ['PYTEST_ISOLATION_CACHE_DIR'], "
            "'venv-templates'))",
            id="rm-rf",
        ),
    ],
)
def test_templates_removed_under_a_running_suite_are_rebuilt(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse, tmp_path: Path, removal: str
) -> None:
    """Templates removed between two tests of a run (by `cleanup --templates` or by hand) are
    built again for the next test, which passes."""
    links = private_wheels(wheelhouse, tmp_path)
    options = f"find_links=[{str(links)!r}], offline=True"
    pytester.makepyfile(REMOVED_IN_THE_MIDDLE.format(options=options, removal=removal))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3)
    assert len(progress(result, "building template")) == 2


def test_cleanup_templates_leaves_a_template_a_live_environment_uses(
    pytester: pytest.Pytester, wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """`cleanup --templates` from another shell does not remove a template that a running test's
    environment is made from: the environment keeps working."""
    links = private_wheels(wheelhouse, tmp_path)
    pytester.makepyfile(
        f"""
        import subprocess, sys
        import pytest

        @pytest.mark.isolated(
            "virtualenv", packages=["tinypkg==1.0"], find_links=[{str(links)!r}], offline=True
        )
        def test_it(isolated_env):
            subprocess.run(
                [sys.executable, "-m", "pytest_isolation", "cleanup", "--templates"], check=True
            )
            assert isolated_env.template.is_dir()
            assert isolated_env.run(["python", "-c", "import tinypkg"]).check()
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert len(templates_for(links, ["tinypkg==1.0"])) == 1


def test_a_template_removed_while_being_cloned_is_built_again(
    wheelhouse: Wheelhouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template that vanishes while an environment is made from it (removed by hand) is
    rebuilt and the environment made; if it keeps vanishing, the error says what happened."""
    from pytest_isolation.engines import virtualenv

    links = private_wheels(wheelhouse, tmp_path)
    real_clone = virtualenv.clone_venv
    removals: list[Path] = []

    def clone_after_removing(template: Path, *args: Any, **kwargs: Any) -> None:
        if len(removals) < limit:
            removals.append(template)
            shutil.rmtree(template)
        real_clone(template, *args, **kwargs)

    monkeypatch.setattr(virtualenv, "clone_venv", clone_after_removing)
    limit = 1
    with IsolationManager() as manager:
        manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
        env = manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
        assert len(removals) == 1
        assert version_in(env) == "1.0"
        limit = 3
        with pytest.raises(EnvironmentCreationError) as failure:
            manager.create("virtualenv", packages=["tinypkg==1.0"], **local(links))
        assert "was removed while in use twice in a row" in str(failure.value)
        assert "something other than pytest-isolation removes templates" in str(failure.value)
        assert len(manager.list()) == 2


KILLED_BUILD_TESTS = """
import pytest

@pytest.mark.isolated("virtualenv", project=True, {options})
def test_it(isolated_env):
    assert isolated_env.run(["python", "-c", "import myproj"]).ok
"""


@pytest.mark.parametrize(
    "editable",
    [
        pytest.param(True, id="killed-in-uv-pip-install"),
        pytest.param(False, id="killed-in-uv-build"),
    ],
)
def test_a_run_killed_during_a_build_leaves_no_process_and_no_half_template(
    pytester: pytest.Pytester,
    wheelhouse: Wheelhouse,
    isolation_state: Ledger,
    editable: bool,
) -> None:
    """SIGKILL of the runner while uv builds (the template's `uv pip install`, or the project's
    `uv build`): the watchdog kills uv and the build backend and removes the half-made
    folder; the next run builds the template and passes."""
    make_project(pytester.path, "myproj", requires=["tinypkg"])
    options = wheelhouse.options() + (", editable=True" if editable else "")
    pytester.makepyfile(test_killed=KILLED_BUILD_TESTS.format(options=options))
    (pytester.path / "slow-build").write_text("")
    started = pytester.path / "build-started"
    with (pytester.path / "output.txt").open("wb") as output:
        runner = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
            cwd=pytester.path,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        backend = int(wait_for(lambda: complete_text(started), "the build to start", 120))
        uv = [p for p in psutil.Process(backend).parents() if p.name() == "uv"]
        assert uv, "the build backend should run under uv"
        building = [r for r in isolation_state.records() if r.kind == "process"]
        assert building, "the build's processes should be in the ledger"
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        doomed = [psutil.Process(backend), *uv]
        wait_for(lambda: all(gone(p) for p in doomed), "uv and the backend to be killed", 10)
        # a record the watchdog has claimed is out of sight while it is being released
        builds = template_root().parent / "projects"
        wait_for(
            lambda: not (half_built_templates() or list(builds.glob(".build-*"))),
            "the half-made folders to be removed",
            10,
        )
        wait_for(lambda: not isolation_state.records(), "the ledger to empty", 10)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    (pytester.path / "slow-build").unlink()
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert len(progress(result, "building template")) == 1


def complete_text(path: Path) -> str | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text or None


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- python= through version managers' shims --------------------------------------------------


@pytest.fixture
def pyenv_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A pyenv-like layout whose shim for this Python's version fails as pyenv's does for an
    installed version it has not selected, with only the shims on PATH; returns the shim and
    the interpreter standing behind it."""
    version = "{}.{}".format(*sys.version_info[:2])
    real = Path(sys._base_executable).resolve()  # type: ignore[attr-defined]
    root = tmp_path / "pyenv"
    installed = root / "versions" / f"{version}.99" / "bin"
    installed.mkdir(parents=True)
    (installed / f"python{version}").symlink_to(real)
    shims = root / "shims"
    shims.mkdir()
    shim = shims / f"python{version}"
    shim.write_text(f"#!/bin/sh\necho 'pyenv: python{version}: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PYENV_ROOT", str(root))
    monkeypatch.setenv("PATH", str(shims))
    return shim, installed / f"python{version}"


@pytest.mark.parametrize("creator", ["uv", "virtualenv"])
@pytest.mark.parametrize("request_kind", ["version", "shim-path"])
def test_python_through_a_pyenv_shim_is_the_real_interpreter(
    pyenv_layout: tuple[Path, Path], wheelhouse: Wheelhouse, creator: str, request_kind: str
) -> None:
    """python='X.Y' with a failing pyenv shim first on PATH, or the shim's own path, gives the
    interpreter pyenv installed; the template is keyed on that interpreter, not the shim."""
    shim, behind = pyenv_layout
    request = "{}.{}".format(*sys.version_info[:2]) if request_kind == "version" else str(shim)
    with IsolationManager() as manager:
        env = venv_of(
            manager.create(
                "virtualenv",
                python=request,
                creator=creator,
                packages=["tinypkg==1.0"],
                **local(wheelhouse.path),
            )
        )
        assert version_in(env) == "1.0"
        show = "import sys; print(sys.base_prefix)"
        assert env.run(["python", "-c", show]).check().stdout.strip() == sys.base_prefix
        (template,) = templates_for(
            wheelhouse.path, ["tinypkg==1.0"], installer=creator, python=str(behind)
        )
        key = json.loads((template / META).read_text())["key"]
        assert key["python"][0] == str(behind.resolve())
        assert "shims" not in json.dumps(key["python"])


def test_a_requirement_named_like_a_folder_here_is_still_a_requirement(
    wheelhouse: Wheelhouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """packages=['tinypkg'] with a folder 'tinypkg' (a project, even) in the working
    directory installs the package from the index settings, not the folder."""
    make_project(tmp_path / "tinypkg", "tinypkg", "9.9")
    monkeypatch.chdir(tmp_path)
    with IsolationManager() as manager:
        env = manager.create("virtualenv", packages=["tinypkg"], **local(wheelhouse.path))
        assert version_in(env) == "2.0"

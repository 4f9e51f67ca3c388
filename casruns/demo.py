"""A guided demo on a throw-away registry: ``python -m casruns.demo [--keep]``.

It drives the real ``casruns`` command, so every line it prints is something you can type.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile


def main() -> int:
    keep = "--keep" in sys.argv
    root = tempfile.mkdtemp(prefix="casruns-demo-")
    env = dict(os.environ, CASRUNS_HOME=root, DEMO_TOKEN="demo-secret-value-123")
    exe = [sys.executable, "-m", "casruns"]

    def sh(*args: str, check: bool = True) -> str:
        print(f"\n$ casruns {' '.join(shlex.quote(a) for a in args)}")
        proc = subprocess.run(exe + list(args), env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        print(out.rstrip())
        if check and proc.returncode not in (0, 10, 11, 12):
            raise SystemExit(f"demo step failed with exit code {proc.returncode}")
        return proc.stdout.strip()

    print(f"casruns demo: registry at {root} (CASRUNS_HOME)")
    sh("init")
    # an orchestrator's follower: started before the first submit, it is told of every change
    # as it commits (no polling); its output is shown at the end
    print("\n$ casruns events --follow &    # runs in the background for the whole demo")
    follower = subprocess.Popen(exe + ["events", "--follow", "--from-now"], env=env, stdout=subprocess.PIPE, text=True)
    ok = sh("submit", "--label", "suite=phpunit", "--secret-env", "DEMO_TOKEN", "--", "sh", "-c",
            'echo "running tests with token $DEMO_TOKEN"; mkdir -p "$CASRUNS_ARTIFACTS_DIR/reports"; '
            'echo "<testsuite tests=\\"3\\"/>" > "$CASRUNS_ARTIFACTS_DIR/reports/junit.xml"; echo "3 passed"')
    bad = sh("submit", "--label", "suite=fuzz", "--", "sh", "-c", "echo crash found >&2; exit 1")
    slow = sh("submit", "--timeout", "1s", "--label", "suite=preview", "--", "sh", "-c", "echo booting preview; sleep 30")
    sh("status", ok)
    sh("wait", ok, bad, slow, "--timeout", "60")
    sh("list")
    sh("status", ok)
    sh("logs", ok)
    sh("logs", bad, "--stream", "transcript")
    sh("artifacts", ok)
    sh("cat", ok, "reports/junit.xml")
    sh("status", slow, "--json")
    export_dir = os.path.join(root, "..", os.path.basename(root) + "-export")
    sh("export", ok, export_dir)
    shutil.rmtree(export_dir, ignore_errors=True)
    sh("promote", ok, "--reason", "phpunit green", "--by", "demo")
    resumed = sh("resume", slow)
    sh("wait", resumed, "--timeout", "5", check=False)
    sh("cancel", resumed, "--reason", "demo over")
    sh("list", "--chain", slow)
    archive_dir = os.path.join(root, "..", os.path.basename(root) + "-archive")
    sh("archive", "push", archive_dir, "--promoted")
    sh("archive", "push", archive_dir, slow)  # an unpromoted run too: the archive's own retention expires it
    sh("archive", "config", archive_dir, "--set", "retention.default=0s", "--set", "gc.grace=0s", "--set", "gc.lease=1s")
    sh("archive", "gc", archive_dir, "--wait")  # the expired run goes, its unshared blobs after it; promoted evidence stays
    sh("archive", "list", archive_dir)
    # make the unpromoted runs old news, then collect them
    with open(os.path.join(root, "config.toml"), "w") as f:  # the demo's own throw-away config
        f.write('gc_grace = "0s"\n[retention]\nsucceeded = "0s"\nfailed = "0s"\ntimed_out = "0s"\ncancelled = "0s"\n')
    sh("gc", "--dry-run")
    sh("gc")
    sh("list")
    sh("verify", "--read-data")
    sh("logs", ok)
    follower.terminate()
    seen = follower.communicate(timeout=30)[0].splitlines()
    print(f"\n(the background follower printed {len(seen)} events as they happened; the first and last few:)")
    print("\n".join(seen[:8] + ["..."] + seen[-6:]))
    sh("events", "--run", ok, "--type", "status", "--type", "promoted")
    shutil.rmtree(archive_dir, ignore_errors=True)
    if keep:
        print(f"\nkept the registry at {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print("\ndemo done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

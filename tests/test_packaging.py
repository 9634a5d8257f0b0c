"""``pip install .`` into a fresh venv gives working console scripts, run outside the repo.

Kept cheap (no download, ~20 s): the venv sees the already-installed stack (torch, megatron-core, DeepSpeed)
through a ``.pth`` line pointing at this interpreter's site-packages (whose own ``.pth``
files, such as an editable megatron-sat install, are *not* processed), and megatron-sat
itself is installed with ``--no-deps --no-build-isolation``, so nothing is downloaded and
the scripts import the installed copy, not the checkout.
"""

import os
import subprocess
import sys
import sysconfig

from test_train_common import REPO


def test_pip_install_gives_console_scripts_outside_the_repo(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, text=True,
                             capture_output=True).stdout.strip()
    shared = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib, "shared_stack.pth"), "w") as f:
        f.write(shared + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"
    build = tmp_path / "src"  # a copy, so the checkout gets no build/ or egg-info
    subprocess.run(["git", "-C", REPO, "archive", "--format=tar", "-o", str(tmp_path / "src.tar"),
                    "HEAD"], check=True)
    build.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "src.tar"), "-C", str(build)], check=True)
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", str(build)], env=env, text=True,
                         capture_output=True, cwd=tmp_path)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    where = subprocess.run([str(py), "-c", "import megatron_sat; print(megatron_sat.__file__)"],
                           env=env, text=True, capture_output=True, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    for script, needle in (("megatron-sat-train", "--sat-schedule"),
                           ("megatron-sat-preprocess", "--tokenizer-type"),
                           ("megatron-sat-convert", "hf-to-megatron"),
                           ("megatron-sat-extend-vocab", "usage"),
                           ("megatron-sat-eval-ppl", "usage")):
        proc = subprocess.run([str(venv / "bin" / script), "--help"], env=env, text=True,
                              capture_output=True, cwd=tmp_path)
        assert proc.returncode == 0 and needle in proc.stdout, (script, proc.stderr[-2000:])
    mod = subprocess.run([str(py), "-m", "megatron_sat.tools.preprocess_data", "--help"],
                         env=env, text=True, capture_output=True, cwd=tmp_path)
    assert mod.returncode == 0 and "--output-prefix" in mod.stdout, mod.stderr

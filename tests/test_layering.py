import subprocess
import sys


def test_the_library_never_imports_ray():
    code = (
        "import sys, pkgutil, importlib, prunevision\n"
        "for m in pkgutil.iter_modules(prunevision.__path__):\n"
        "    if m.name not in ('cli', '__main__'):\n"
        "        importlib.import_module('prunevision.' + m.name)\n"
        "from prunevision.cli import main\n"
        "assert main(['train', '--smoke-test', '--out', sys.argv[1], '--set', 'measure.enabled=false']) == 0\n"
        "print('ray' in sys.modules)\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"

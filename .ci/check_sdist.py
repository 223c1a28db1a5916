"""Run by `make pip-check`: the sdist carries every file a wheel is built from, as git tracks them: the
C++/CUDA sources and headers (csrc/), the build backend, setup.py, pyproject.toml, MANIFEST.in, the
package, and never a built extension or its build record."""

import subprocess
import sys
import tarfile

sdist = sys.argv[1]
with tarfile.open(sdist) as tar:
    names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
tracked = subprocess.run(["git", "ls-files", "csrc", "build_backend", "pddm_ext", "setup.py", "pyproject.toml",
                          "MANIFEST.in", "README.md"], capture_output=True, text=True, check=True).stdout.split()
missing = sorted(set(tracked) - names)
assert tracked and not missing, f"{sdist} lacks: {missing}"
built = sorted(name for name in names if name.endswith((".so", "_build_info.json")))
assert not built, f"{sdist} carries build outputs: {built}"
headers = [name for name in tracked if name.endswith((".h", ".cuh"))]
print(f"check_sdist: {sdist} carries all {len(tracked)} tracked build files ({len(headers)} headers)")

"""The one compiled part: the writer's window-mean kernel (everything else is in pyproject.toml).

It is optional: without a C compiler the package still installs and pyramid.py does the same work with numpy
(the same values, slower). EM_INGEST_REQUIRE_NATIVE=1 makes a failed build an error instead (the Docker image
and CI set it, so a missing compiler cannot silently cost them the fast path).
"""

import os

from setuptools import Extension, setup

required = os.environ.get("EM_INGEST_REQUIRE_NATIVE", "") not in ("", "0")
setup(ext_modules=[Extension("em_ingest.omezarr._windows", ["em_ingest/omezarr/_windows.c"],
                             extra_compile_args=["-O3", "-fno-strict-aliasing"], optional=not required)])

// Compile-time checks of the C ABI's struct layouts: the Python binding (python/kvpack/_abi.py)
// mirrors these with ctypes, so a change here must change it too and bump KVPACK_ABI_VERSION.
#include "kvpack.h"

_Static_assert(sizeof(kvpack_error) == 1104, "kvpack_error layout changed");
_Static_assert(sizeof(kvpack_geometry) == 40, "kvpack_geometry layout changed");
_Static_assert(sizeof(kvpack_rows) == 32, "kvpack_rows layout changed");
_Static_assert(sizeof(kvpack_create_options) == 104, "kvpack_create_options layout changed");

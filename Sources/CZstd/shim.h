// libzstd from Debian's libzstd-dev (`make setup` installs it).
#include <zstd.h>

// libxxhash from Debian's libxxhash-dev (`make setup` installs it).
// XXH3-64 checksums every KVPack frame; see Spec/kvpack-format.md, "Checksums".
#include <xxhash.h>

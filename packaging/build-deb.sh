#!/bin/sh
# Builds target/debian/smsdrop_<version>_<arch>.deb from a release build (make deb); the
# binary and the output folder can be given as SMSDROP_BIN and SMSDROP_DEB_OUT (the tests do).
#
# The tree is staged by hand and packed with dpkg-deb: the package is one binary, a conffile,
# the unit, a man page and completions (generated from the CLI definition by the binary
# itself), and maintainer scripts that honour DPKG_ROOT.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
bin="${SMSDROP_BIN:-$top/target/release/smsdrop}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
out="${SMSDROP_DEB_OUT:-$top/target/debian}"
stage="$out/stage"

rm -rf "$stage"
mkdir -p "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/smsdrop" "$stage/lib/systemd/system" \
    "$stage/usr/lib/sysusers.d" "$stage/usr/share/man/man8" "$stage/usr/share/doc/smsdrop" \
    "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
    "$stage/usr/share/fish/vendor_completions.d"

install -m 0755 "$bin" "$stage/usr/bin/smsdrop"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/smsdrop"
install -m 0644 "$top/etc/smsdrop.toml" "$stage/etc/smsdrop/smsdrop.toml"
install -m 0644 "$top/systemd/smsdrop.service" "$stage/lib/systemd/system/smsdrop.service"
install -m 0644 "$top/packaging/deb/sysusers.conf" "$stage/usr/lib/sysusers.d/smsdrop.conf"

gen="$out/generated"
rm -rf "$gen"
"$bin" generate "$gen"
gzip -9n <"$gen/smsdrop.8" >"$stage/usr/share/man/man8/smsdrop.8.gz"
chmod 0644 "$stage/usr/share/man/man8/smsdrop.8.gz"
install -m 0644 "$gen/smsdrop" "$stage/usr/share/bash-completion/completions/smsdrop"
install -m 0644 "$gen/_smsdrop" "$stage/usr/share/zsh/vendor-completions/_smsdrop"
install -m 0644 "$gen/smsdrop.fish" "$stage/usr/share/fish/vendor_completions.d/smsdrop.fish"

install -m 0644 "$top/packaging/deb/copyright" "$stage/usr/share/doc/smsdrop/copyright"
install -m 0644 "$top/packaging/grafana-dashboard.json" "$stage/usr/share/doc/smsdrop/grafana-dashboard.json"
mkdir -p "$stage/usr/share/lintian/overrides"
install -m 0644 "$top/packaging/deb/lintian-overrides" "$stage/usr/share/lintian/overrides/smsdrop"
sed "s/@VERSION@/$version/" "$top/packaging/deb/changelog" | gzip -9n >"$stage/usr/share/doc/smsdrop/changelog.gz"
chmod 0644 "$stage/usr/share/doc/smsdrop/changelog.gz"

for script in postinst prerm postrm; do
    install -m 0755 "$top/packaging/deb/$script" "$stage/DEBIAN/$script"
done
echo "/etc/smsdrop/smsdrop.toml" >"$stage/DEBIAN/conffiles"
chmod 0644 "$stage/DEBIAN/conffiles"

# The newest glibc symbol version the binary needs, as dpkg-shlibdeps would put it.
glibc=$(objdump -T "$stage/usr/bin/smsdrop" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
depends="libc6 (>= $glibc), libgcc-s1, adduser"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
    "$top/packaging/deb/control.in" >"$stage/DEBIAN/control"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/control"

deb="$out/smsdrop_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"

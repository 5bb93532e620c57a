#!/usr/bin/env bash
# Prints the absolute path of a directory holding about BIG_MIB MiB (default 128) of
# real host binaries, creating it on first use. It is the `bigSource` of the test
# package set (integration-tests/pkgs), which copies it into the package `bigpkg`.
#
# The choice is deterministic on a given machine: ELF files of 64 KiB..40 MiB under
# /usr/lib/gcc and /usr/lib/x86_64-linux-gnu (one per inode), in the order of the md5
# of their path (a fixed pseudo-random mix of compilers, libraries and plugins), each
# taken while the total stays within BIG_MIB. The directory is named after a hash of
# the selection (path, size, mtime): the same selection gives the same store path, a
# changed host (apt upgrade) a new one.
set -euo pipefail
cache=${NIXERY_BENCH_CACHE:-/var/tmp/nixery-bench}
mkdir -p "$cache"

list=$(mktemp)
trap 'rm -f "$list"' EXIT
BIG_MIB=${BIG_MIB:-128} perl -MFile::Find -MDigest::MD5=md5_hex -e '
  my $cap = $ENV{BIG_MIB} * 1024 * 1024;
  my (%inode, @c);
  find({ no_chdir => 1, wanted => sub {
    my $p = $File::Find::name;
    return unless -f $p && !-l $p;
    my @st = lstat($p);
    my $size = $st[7];
    return if $size < 64 * 1024 || $size > 40 * 1024 * 1024 || $inode{$st[1]}++;
    open(my $fh, "<", $p) or return;
    my $magic = "";
    read($fh, $magic, 4);
    close($fh);
    return unless $magic eq "\x7fELF";
    push @c, [md5_hex($p), $size, $st[9], $p];
  }}, "/usr/lib/gcc", "/usr/lib/x86_64-linux-gnu");
  my $total = 0;
  for my $f (sort { $a->[0] cmp $b->[0] } @c) {
    next if $total + $f->[1] > $cap;
    $total += $f->[1];
    print "$f->[1] $f->[2] $f->[3]\n";
  }
' > "$list"

[ -s "$list" ] || { echo "bigsource: no host binaries found" >&2; exit 1; }
dir="$cache/bigsource-$(md5sum < "$list" | cut -c1-16)"
if [ ! -f "$dir.complete" ]; then
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  while read -r _ _ path; do
    mkdir -p "$dir.tmp$(dirname "$path")"
    cp --preserve=mode "$path" "$dir.tmp$path"
  done < "$list"
  mv "$dir.tmp" "$dir"
  touch "$dir.complete"
fi
echo "$dir"

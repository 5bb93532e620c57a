# A tiny nixpkgs-shaped package set for the integration tests.
#
# Everything is built from one host tool, Debian's statically linked
# busybox (package `busybox-static`), so no binary cache and no compiler is
# needed, and every program really runs inside a container or a chroot.
#
# Every runnable program is a script whose shebang is `${busybox}/bin/sh`,
# so the runtime closure of each package contains the `busybox` derivation
# (a dependency that all images share).
#
# Arguments:
#   system     passed to every derivation, so `system = "aarch64-linux"`
#              fails cleanly at build time on an x86_64 host.
#   salt       mixed into every derivation's environment. The contents of an
#              optional file `salt` next to this file are appended, so a test
#              can copy this directory, write a random salt and get fresh
#              builds (new store paths) without touching the shared store.
#   bigSource  a host directory copied into `bigpkg` (benchmarks). Also read
#              from an optional file `bigsource` next to this file (holding an
#              absolute path) or from env NIXERY_TEST_BIG_SOURCE. When none is
#              set, `bigpkg` is a tiny package.
#   slowSeconds how long `slow` sleeps while building (default 30).
{ system ? builtins.currentSystem
, salt ? ""
, bigSource ? null
, slowSeconds ? 30
, ...
}:

let
  fileSalt = if builtins.pathExists ./salt then builtins.readFile ./salt else "";
  theSalt = salt + fileSalt;

  trim = s: builtins.head (builtins.match "[[:space:]]*([^[:space:]]*)[[:space:]]*" s);
  envBig = builtins.getEnv "NIXERY_TEST_BIG_SOURCE";
  bigPath =
    if bigSource != null then bigSource
    else if builtins.pathExists ./bigsource then trim (builtins.readFile ./bigsource)
    else if envBig != "" then envBig
    else null;

  # The host's busybox as a store directory holding the single file
  # `busybox`. On merged-/usr systems /bin is a symlink, and builtins.path on
  # a symlink copies the link itself, so prefer /usr/bin.
  hostBinDir = if builtins.pathExists /usr/bin/busybox then /usr/bin else /bin;
  hostBusybox = builtins.path {
    path = hostBinDir;
    name = "host-busybox";
    filter = p: t: baseNameOf p == "busybox";
  };

  # busybox: bin/busybox, bin/sh -> busybox, and one symlink per applet.
  busybox = derivation {
    name = "busybox-1.35.0";
    inherit system;
    builder = "${hostBusybox}/busybox";
    args = [
      "sh"
      "-c"
      ''
        set -e
        bb=${hostBusybox}/busybox
        $bb mkdir -p $out/bin
        $bb cp $bb $out/bin/busybox
        $bb chmod 0555 $out/bin/busybox
        $out/bin/busybox --install -s $out/bin
        $bb rm -f $out/bin/sh
        $bb ln -s busybox $out/bin/sh
      ''
    ];
    salt = theSalt;
  };

  bbsh = "${busybox}/bin/sh";

  # mkDerivation-lite: `script` runs under busybox sh with PATH set to the
  # busybox applets; `set -e` is on. Extra attributes become environment
  # variables (as with `derivation`), except `passthru` and `meta`.
  mkPkg = { name, script, outputs ? [ "out" ], passthru ? { }, meta ? { }, ... }@args:
    let
      drvArgs = removeAttrs args [ "script" "passthru" "meta" ];
      drv = derivation (drvArgs // {
        inherit name system outputs;
        builder = bbsh;
        args = [ "-c" ("set -e\n" + script) ];
        PATH = "${busybox}/bin";
        salt = theSalt;
      });
    in
    drv // passthru // { inherit meta; };

  # A package whose bin/ holds the given scripts: { name = "body"; }.
  # Each body gets a `#!${busybox}/bin/sh` shebang.
  scriptsPkg = { name, scripts, extraScript ? "", ... }@args:
    mkPkg ((removeAttrs args [ "scripts" "extraScript" ]) // {
      inherit name;
      script = ''
        mkdir -p $out/bin
      '' + builtins.concatStringsSep "" (map
        (n: ''
          cat > $out/bin/${n} <<'NIXERY_EOF'
          #!${bbsh}
          ${scripts.${n}}
          NIXERY_EOF
          chmod 0555 $out/bin/${n}
        '')
        (builtins.attrNames scripts)) + extraScript;
    });

  libshared = mkPkg {
    name = "libshared-1.0";
    script = ''
      mkdir -p $out/share/libshared $out/lib
      echo 'shared data from libshared' > $out/share/libshared/greeting
      echo 'not really a shared object' > $out/lib/libshared.so.1
    '';
  };

  figletBanner = ''
    text="$*"
    border="##$(echo "$text" | ${busybox}/bin/sed 's/./#/g')##"
    echo "$border"
    echo "# $text #"
    echo "$border"
  '';

  set = {
    inherit busybox libshared;

    # Helpers in the spirit of nixpkgs, built from busybox only.
    runCommand = name: env: script: mkPkg (env // { inherit name script; });
    writeText = name: text: mkPkg {
      inherit name text;
      passAsFile = [ "text" ];
      script = ''cp "$textPath" $out'';
    };
    symlinkJoin = { name, paths, ... }: mkPkg {
      inherit name paths;
      script = ''
        mkdir -p $out
        for p in $paths; do
          (cd "$p" && find . -mindepth 1 -type d) | while read -r d; do mkdir -p "$out/$d"; done
          (cd "$p" && find . -mindepth 1 ! -type d) | while read -r f; do
            [ -e "$out/$f" ] || [ -L "$out/$f" ] || ln -s "$p/$f" "$out/$f"
          done
        done
      '';
    };

    hello = scriptsPkg {
      name = "hello-2.12.1";
      scripts.hello = ''echo 'Hello, world!' '';
    };

    cowsay = scriptsPkg {
      name = "cowsay-3.7.0";
      scripts.cowsay = ''
        msg="$*"
        line=$(echo "$msg" | ${busybox}/bin/sed 's/./-/g')
        under=$(echo "$msg" | ${busybox}/bin/sed 's/./_/g')
        echo " _$under"
        echo "< $msg >"
        echo " -$line"
        echo '        \   ^__^'
        echo '         \  (oo)\_______'
        echo '            (__)\       )\/\'
        echo '                ||----w |'
        echo '                ||     ||'
      '';
    };

    tools = {
      figlet = scriptsPkg {
        name = "figlet-2.2.5";
        scripts.figlet = figletBanner;
      };
    };

    bashInteractive = scriptsPkg {
      name = "bash-interactive-5.2";
      scripts.bash = ''exec ${bbsh} "$@"'';
      extraScript = ''
        ln -s ${busybox}/bin/busybox $out/bin/sh
      '';
    };

    coreutils = mkPkg {
      name = "coreutils-9.3";
      script = ''
        mkdir -p $out/bin
        for a in basename cat chmod chown cp cut date dd df dirname du echo env \
                 false head id ln ls mkdir mktemp mv printf pwd readlink realpath \
                 rm rmdir seq sh sleep sort stat tail tee test touch tr true uname \
                 uniq wc whoami yes; do
          ln -s ${busybox}/bin/busybox $out/bin/$a
        done
      '';
    };

    moreutils = scriptsPkg {
      name = "moreutils-0.67";
      scripts.sponge = ''
        tmp=$(${busybox}/bin/mktemp)
        ${busybox}/bin/cat > "$tmp"
        if [ $# -eq 0 ]; then ${busybox}/bin/cat "$tmp"; else ${busybox}/bin/cat "$tmp" > "$1"; fi
        ${busybox}/bin/rm -f "$tmp"
      '';
      scripts.ts = ''
        while IFS= read -r l; do echo "$(${busybox}/bin/date '+%b %d %H:%M:%S') $l"; done
      '';
    };

    nano = scriptsPkg {
      name = "nano-7.2";
      scripts.nano = ''
        if [ "$1" = --version ]; then echo ' GNU nano, version 7.2 (busybox vi shim)'; exit 0; fi
        exec ${busybox}/bin/vi "$@"
      '';
    };

    cacert = mkPkg {
      name = "nss-cacert-3.0";
      script = ''
        mkdir -p $out/etc/ssl/certs
        cat > $out/etc/ssl/certs/ca-bundle.crt <<'EOF'
        # nixery integration-test CA bundle (no real certificates)
        EOF
      '';
    };

    iana-etc = mkPkg {
      name = "iana-etc-20230316";
      script = ''
        mkdir -p $out/etc
        printf 'ip\t0\tIP\ntcp\t6\tTCP\nudp\t17\tUDP\n' > $out/etc/protocols
        printf 'ssh\t22/tcp\nhttp\t80/tcp\nhttps\t443/tcp\n' > $out/etc/services
      '';
    };

    # Multi-output: the default output (first) is `bin`; bin/multiout reads a
    # file from `out` (a runtime reference); `dev` is not referenced.
    multiout = mkPkg {
      name = "multiout-1.0";
      outputs = [ "bin" "out" "dev" ];
      script = ''
        mkdir -p $bin/bin $out/share/multiout $dev/include
        echo 'multiout data' > $out/share/multiout/message
        echo '#define MULTIOUT 1' > $dev/include/multiout.h
        cat > $bin/bin/multiout <<EOF
        #!${bbsh}
        echo "multiout: \$(${busybox}/bin/cat $out/share/multiout/message)"
        EOF
        chmod 0555 $bin/bin/multiout
      '';
    };

    broken = mkPkg {
      name = "broken-1.0";
      script = ''
        echo 'building broken-1.0 ...'
        echo 'error: broken-1.0 deliberately fails to build' >&2
        exit 1
      '';
    };

    alpha = scriptsPkg {
      name = "alpha-1.0";
      scripts.alpha = ''echo "alpha: $(${busybox}/bin/cat ${libshared}/share/libshared/greeting)"'';
    };

    beta = scriptsPkg {
      name = "beta-1.0";
      scripts.beta = ''echo "beta: $(${busybox}/bin/cat ${libshared}/share/libshared/greeting)"'';
    };

    # nixpkgs names attributes that start with a digit with a leading `_`.
    _7zip = scriptsPkg {
      name = "7zip-23.01";
      scripts."7z" = ''echo '7-Zip 23.01 (busybox shim)' '';
    };

    # Incompressible data, so its layer spans several upload chunks;
    # `noise-check` verifies the data inside the running image.
    noise = scriptsPkg {
      name = "noise-1.0";
      scripts.noise-check = ''
        bin=$(${busybox}/bin/dirname "$(${busybox}/bin/readlink -f "$0")")
        cd "$bin/../share/noise" && ${busybox}/bin/sha256sum -c SHA256SUMS
      '';
      extraScript = ''
        mkdir -p $out/share/noise
        head -c 6291456 /dev/urandom > $out/share/noise/data
        (cd $out/share/noise && sha256sum data > SHA256SUMS)
      '';
    };

    slow = scriptsPkg {
      name = "slow-1.0";
      scripts.slow = ''echo 'slow finished' '';
      extraScript = ''
        sleep ${toString slowSeconds}
      '';
    };

    bigpkg =
      if bigPath == null then
        mkPkg {
          name = "bigpkg-0";
          script = ''
            mkdir -p $out/share/bigpkg
            echo 'no bigSource given' > $out/share/bigpkg/README
          '';
        }
      else
        let src = builtins.path { path = bigPath; name = "bigpkg-source"; };
        in mkPkg {
          name = "bigpkg-1.0";
          script = ''
            mkdir -p $out/share
            cp -r ${src} $out/share/bigpkg
            chmod -R u+w $out/share/bigpkg
          '';
        };
  };
in
set

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
# Where a registry must not depend on its host, this set behaves as nixpkgs
# does, leaks included, so that tests can show the registry closes them:
# `config` and `overlays` default to what the caller's HOME, NIXPKGS_CONFIG
# and NIX_PATH say, and packages whose `meta` makes them unfree, insecure,
# broken or meant for another platform throw nixpkgs' refusal (with its
# advice) when their drvPath or outPath is forced, unless the config or a
# NIXPKGS_ALLOW_* variable allows them.
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
#              set, `bigpkg` is a tiny package. An optional file
#              `bigsourcehash` next to this file holds the source's NAR hash
#              (`nix-hash --type sha256 --base32`): then the source is a fixed
#              output, as a nixpkgs package's is, and evaluation does not read
#              it again once it is in the store.
#   slowSeconds how long `slow` sleeps while building (default 30).
#   graphSeconds how long each `graph.gN` sleeps while building (default 0.5).
#   config     nixpkgs' config: allowUnfree, allowUnfreePredicate,
#              permittedInsecurePackages, allowBroken, allowUnsupportedSystem.
#              When not given: the file named by env NIXPKGS_CONFIG, else
#              $HOME/.config/nixpkgs/config.nix, else { }. A function is
#              called with { pkgs }.
#   overlays   a list of `final: prev: { … }`. When not given: the overlays
#              of <nixpkgs-overlays> (NIX_PATH), else
#              $HOME/.config/nixpkgs/overlays.nix, else every *.nix in
#              $HOME/.config/nixpkgs/overlays/.
#
# A file `cache-only` next to this file makes every builder of the set fail
# at once, so whatever is pulled then must come from a binary cache. The
# file is looked for at build time, so it changes no derivation.
{ system ? builtins.currentSystem
, salt ? ""
, bigSource ? null
, slowSeconds ? 30
, graphSeconds ? "0.5"
, config ? null
, overlays ? null
, ...
}@args:

let
  inherit (builtins) attrNames concatStringsSep elem filter getEnv isFunction isList
    match pathExists readDir;

  fileSalt = if pathExists ./salt then builtins.readFile ./salt else "";
  theSalt = salt + fileSalt;

  trim = s: builtins.head (builtins.match "[[:space:]]*([^[:space:]]*)[[:space:]]*" s);
  envBig = builtins.getEnv "NIXERY_TEST_BIG_SOURCE";
  bigPath =
    if bigSource != null then bigSource
    else if builtins.pathExists ./bigsource then trim (builtins.readFile ./bigsource)
    else if envBig != "" then envBig
    else null;
  bigHash =
    if builtins.pathExists ./bigsourcehash then trim (builtins.readFile ./bigsourcehash)
    else null;

  # --- nixpkgs' impure defaults (lib/impure.nix), taken only when the caller
  # --- passes no `config` / `overlays`.
  homeDir = getEnv "HOME";
  configEnv = getEnv "NIXPKGS_CONFIG";
  homeConfig = homeDir + "/.config/nixpkgs/config.nix";
  impureConfig =
    if configEnv != "" && pathExists configEnv then import configEnv
    else if homeDir != "" && pathExists homeConfig then import homeConfig
    else { };

  isDir = p: pathExists (p + "/.");
  overlaysAt = p:
    if isDir p then
      map (n: import (p + "/" + n))
        (filter (n: match ".*\\.nix" n != null && match "\\.#.*" n == null)
          (attrNames (readDir p)))
    else import p;
  nixPathOverlays =
    let r = builtins.tryEval (toString <nixpkgs-overlays>);
    in if r.success then r.value else "";
  homeOverlaysFile = homeDir + "/.config/nixpkgs/overlays.nix";
  homeOverlaysDir = homeDir + "/.config/nixpkgs/overlays";
  impureOverlays =
    if nixPathOverlays != "" && pathExists nixPathOverlays then overlaysAt nixPathOverlays
    else if homeDir != "" && pathExists homeOverlaysFile then overlaysAt homeOverlaysFile
    else if homeDir != "" && pathExists homeOverlaysDir then overlaysAt homeOverlaysDir
    else [ ];

  config0 = if args ? config then config else impureConfig;
  cfg = if isFunction config0 then config0 { pkgs = final; } else config0;
  theOverlays = if args ? overlays then overlays else impureOverlays;

  # --- nixpkgs' meta checks (pkgs/stdenv/generic/check-meta.nix), in small.
  envAllows = var: getEnv var == "1";
  allowUnfree = (cfg.allowUnfree or false) || envAllows "NIXPKGS_ALLOW_UNFREE";
  allowInsecure = envAllows "NIXPKGS_ALLOW_INSECURE";
  allowBroken = (cfg.allowBroken or false) || envAllows "NIXPKGS_ALLOW_BROKEN";
  allowUnsupported = (cfg.allowUnsupportedSystem or false)
    || envAllows "NIXPKGS_ALLOW_UNSUPPORTED_SYSTEM";
  permittedInsecure = cfg.permittedInsecurePackages or [ ];

  hostPlatformConfig = {
    x86_64-linux = "x86_64-unknown-linux-gnu";
    aarch64-linux = "aarch64-unknown-linux-gnu";
    i686-linux = "i686-unknown-linux-gnu";
    x86_64-darwin = "x86_64-apple-darwin";
    aarch64-darwin = "aarch64-apple-darwin";
  }.${system} or system;

  toList = x: if isList x then x else [ x ];
  licenses = meta: toList (meta.license or [ ]);
  isUnfree = meta: builtins.any (l: !(l.free or true)) (licenses meta);
  showLicense = meta:
    concatStringsSep ", " (map (l: l.shortName or l.fullName or "unknown") (licenses meta));
  showList = l: "[ " + concatStringsSep " " (map (p: "\"${p}\"") l) + " ]";

  flakeNote = ''

     Note: When using `nix shell`, `nix build`, `nix develop`, etc with a flake,
           then pass `--impure` in order to allow use of environment variables.
  '';

  allowAdvice = { attr, envVar, phrase, amendment ? "" }: ''
    a) To temporarily allow ${phrase}, you can use an environment variable
       for a single invocation of the nix tools.

         $ export ${envVar}=1
    ${flakeNote}
    b) For `nixos-rebuild` you can set
      { nixpkgs.config.allow${attr} = true; }
    in configuration.nix to override this.
    ${amendment}
    c) For `nix-env`, `nix-build`, `nix-shell` or any other Nix command you can add
      { allow${attr} = true; }
    to ~/.config/nixpkgs/config.nix.
  '';

  insecureAdvice = name: meta: ''

    Known issues:
  '' + concatStringsSep "" (map (i: " - ${i}\n") meta.knownVulnerabilities) + ''

    You can install it anyway by allowing this package, using the
    following methods:

    a) To temporarily allow all insecure packages, you can use an environment
       variable for a single invocation of the nix tools:

         $ export NIXPKGS_ALLOW_INSECURE=1
    ${flakeNote}
    b) for `nixos-rebuild` you can add ‘${name}’ to
       `nixpkgs.config.permittedInsecurePackages` in the configuration.nix,
       like so:

         {
           nixpkgs.config.permittedInsecurePackages = [
             "${name}"
           ];
         }

    c) For `nix-env`, `nix-build`, `nix-shell` or any other Nix command you can add
    ‘${name}’ to `permittedInsecurePackages` in
    ~/.config/nixpkgs/config.nix, like so:

         {
           permittedInsecurePackages = [
             "${name}"
           ];
         }
  '';

  # The first problem of a package, as { errormsg, advice }, or null.
  metaProblem = name: meta:
    if isUnfree meta && !allowUnfree
      && !((cfg.allowUnfreePredicate or (_: false)) { inherit name meta; }) then {
      errormsg = "has an unfree license (‘${showLicense meta}’)";
      advice = allowAdvice {
        attr = "Unfree";
        envVar = "NIXPKGS_ALLOW_UNFREE";
        phrase = "unfree packages";
        amendment = ''

          Alternatively you can configure a predicate to allow specific packages:
            { nixpkgs.config.allowUnfreePredicate = pkg: builtins.elem (lib.getName pkg) [
                "${(builtins.parseDrvName name).name}"
              ];
            }
        '';
      };
    }
    else if (meta.knownVulnerabilities or [ ]) != [ ] && !allowInsecure
      && !(elem name permittedInsecure) then {
      errormsg = "is marked as insecure";
      advice = insecureAdvice name meta;
    }
    else if (meta.broken or false) && !allowBroken then {
      errormsg = "is marked as broken";
      advice = allowAdvice {
        attr = "Broken";
        envVar = "NIXPKGS_ALLOW_BROKEN";
        phrase = "broken packages";
      };
    }
    else if meta ? platforms && !(elem system meta.platforms) && !allowUnsupported then {
      errormsg = ''
        is not available on the requested hostPlatform:
          hostPlatform.config = "${hostPlatformConfig}"
          package.meta.platforms = ${showList meta.platforms}
      '';
      advice = allowAdvice {
        attr = "UnsupportedSystem";
        envVar = "NIXPKGS_ALLOW_UNSUPPORTED_SYSTEM";
        phrase = "packages that are unsupported for this system";
      };
    }
    else null;

  # true, or nixpkgs' refusal thrown.
  metaValid = name: pos: meta:
    let
      problem = metaProblem name meta;
      where = if pos == null then "«unknown-file»" else "${pos.file}:${toString pos.line}";
    in
    if problem == null then true
    else throw (''
      Package ‘${name}’ in ${where} ${problem.errormsg}, refusing to evaluate.

    '' + problem.advice);

  # The cache-only switch: a string, so the directory is not copied into the
  # store, read by every builder when it starts.
  cacheOnlyFlag = toString ./. + "/cache-only";
  cacheOnlyCheck = ''
    if [ -e "$cacheOnlyFlag" ]; then
      echo "error: $name can only come from a binary cache here (cache-only)" >&2
      exit 1
    fi
  '';

  # The host's busybox as a store directory holding the single file
  # `busybox`. On merged-/usr systems /bin is a symlink, and builtins.path on
  # a symlink copies the link itself, so prefer /usr/bin.
  hostBinDir =
    if pathExists /usr/bin/busybox then /usr/bin
    else if pathExists /bin/busybox then /bin
    else throw "the bundled test package set needs a static busybox on the host: install Debian's busybox-static";
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
      (cacheOnlyCheck + ''
        set -e
        bb=${hostBusybox}/busybox
        $bb mkdir -p $out/bin
        $bb cp $bb $out/bin/busybox
        $bb chmod 0555 $out/bin/busybox
        $out/bin/busybox --install -s $out/bin
        $bb rm -f $out/bin/sh
        $bb ln -s busybox $out/bin/sh
      '')
    ];
    salt = theSalt;
    inherit cacheOnlyFlag;
  };

  bbsh = "${busybox}/bin/sh";

  # mkDerivation-lite: `script` runs under busybox sh with PATH set to the
  # busybox applets; `set -e` is on. Extra attributes become environment
  # variables (as with `derivation`), except `passthru`, `meta` and `pos`.
  # As in nixpkgs, a package that `meta` refuses throws when its drvPath or
  # outPath (of any output) is forced; `pos` (default: where `name` is
  # written) is where the refusal says the package is.
  mkPkg = { name, script, outputs ? [ "out" ], passthru ? { }, meta ? { }, ... }@args:
    let
      drvArgs = removeAttrs args [ "script" "passthru" "meta" "pos" ];
      drv = derivation (drvArgs // {
        inherit name system outputs cacheOnlyFlag;
        builder = bbsh;
        args = [ "-c" (cacheOnlyCheck + "set -e\n" + script) ];
        PATH = "${busybox}/bin";
        salt = theSalt;
      });
      valid = metaValid name (args.pos or (builtins.unsafeGetAttrPos "name" args)) meta;
      checked = output: output // {
        drvPath = assert valid; output.drvPath;
        outPath = assert valid; output.outPath;
      };
      outputsList = map (o: { name = o; value = checked drv.${o} // extra; }) outputs;
      extra = passthru // { inherit meta; } // builtins.listToAttrs outputsList
        // { all = map (o: o.value) outputsList; };
    in
    checked drv // extra;

  # A package whose bin/ holds the given scripts: { name = "body"; }.
  # Each body gets a `#!${busybox}/bin/sh` shebang.
  scriptsPkg = { name, scripts, extraScript ? "", ... }@args:
    mkPkg ((removeAttrs args [ "scripts" "extraScript" ]) // {
      inherit name;
      pos = args.pos or (builtins.unsafeGetAttrPos "name" args);
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

  # 40 packages in a dependency graph, for many new images at once over a
  # shared base (scripts/bench): g0..g9 form a chain, every later gN needs
  # g(N-10) and g(N mod 10). Each build sleeps graphSeconds, and each output
  # names its dependencies, so they are in its closure.
  graph = builtins.listToAttrs (builtins.genList
    (i: {
      name = "g${toString i}";
      value = scriptsPkg {
        name = "g${toString i}-1.0";
        scripts."g${toString i}" = ''echo g${toString i}'';
        deps = map (j: graph."g${toString j}")
          (if i == 0 then [ ] else if i < 10 then [ (i - 1) ]
          else [ (i - 10) (i - (i / 10) * 10) ]);
        extraScript = ''
          sleep ${graphSeconds}
          mkdir -p $out/share
          echo "$deps" > $out/share/deps
        '';
      };
    })
    40);

  set = {
    inherit busybox libshared graph;

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
      # As nixpkgs describes it; the SBOM reports both.
      meta = {
        license = { spdxId = "GPL-3.0-or-later"; shortName = "gpl3Plus"; free = true; };
        homepage = "https://www.gnu.org/software/hello/manual/";
      };
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

    # 1 GiB of random data, in 64 files (one layer): how much memory a layer far
    # larger than any buffer costs the server.
    noise1g = mkPkg {
      name = "noise1g-1.0";
      script = ''
        mkdir -p $out/share/noise1g
        for i in $(seq 64); do
          head -c 16777216 /dev/urandom > $out/share/noise1g/data-$i
        done
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
        let src = builtins.path ({ path = bigPath; name = "bigpkg-source"; }
          // (if bigHash == null then { } else { sha256 = bigHash; }));
        in mkPkg {
          name = "bigpkg-1.0";
          script = ''
            mkdir -p $out/share
            cp -r ${src} $out/share/bigpkg
            chmod -R u+w $out/share/bigpkg
          '';
        };

    # Packages nixpkgs would refuse, each for one reason of its meta.
    unfreeapp = scriptsPkg {
      name = "unfreeapp-1.0";
      scripts.unfreeapp = ''echo 'unfreeapp runs' '';
      meta.license = { shortName = "unfree"; fullName = "Unfree"; free = false; };
    };

    oldssl = scriptsPkg {
      name = "oldssl-1.0";
      scripts.oldssl = ''echo 'oldssl 1.0 (insecure)' '';
      meta.knownVulnerabilities = [ "CVE-2099-0001: test vulnerability" ];
    };

    markedbroken = scriptsPkg {
      name = "markedbroken-1.0";
      scripts.markedbroken = ''echo 'markedbroken runs' '';
      meta.broken = true;
    };

    armonly = scriptsPkg {
      name = "armonly-1.0";
      scripts.armonly = ''echo 'armonly runs' '';
      meta.platforms = [ "aarch64-linux" ];
    };

    # Its source comes from a URL nothing listens on (port 9, discard), so it
    # evaluates and then fails to realise with Nix's download error.
    unreachable = mkPkg {
      name = "unreachable-1.0";
      src = unreachableSrc;
      script = ''
        mkdir -p $out/share
        cp $src $out/share/unreachable-1.0.tar.gz
      '';
    };
  };

  unreachableSrc = derivation {
    name = "unreachable-1.0.tar.gz";
    builder = "builtin:fetchurl";
    system = "builtin";
    url = "http://127.0.0.1:9/unreachable-1.0.tar.gz";
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "0000000000000000000000000000000000000000000000000000";
    preferLocalBuild = true;
    salt = theSalt;
  };

  # Overlays over the set, each seeing the result so far as `final` and `prev`.
  final = builtins.foldl' (acc: overlay: acc // overlay acc acc) set theOverlays;
in
final

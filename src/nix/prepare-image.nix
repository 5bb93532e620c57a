# Resolves the packages of one image request in a package set and reports, as JSON,
# each package's derivation and output path, or which names could not be resolved.
#
# Every argument arrives through `--argstr`. The requested names come as a JSON list
# in `packages` and are only ever used as attribute names to look up; nothing from a
# request is spliced into Nix code. Realising the derivations and reading the closure
# graph is left to `nix-store`, so this file needs nothing from the package set but
# the packages themselves.
#
# `batch` does the same for many requests at once (`requests`, a JSON list of name
# lists), so that the package set is imported once for all of them: each request's
# result is `{ ok = true; info = …; }`, or `{ ok = false; }` where evaluating it
# threw (an unfree or broken package), for the caller to evaluate that one alone
# and read its error.
{ srcType, srcArgs, system, packages ? "[]", requests ? "[]", optional ? "[]", allowUnfree ? "false", nixpkgsConfig ? "" }:

let
  inherit (builtins)
    attrNames filter fromJSON hasAttr head isAttrs isFunction map match replaceStrings split tail;

  source =
    if srcType == "path" then srcArgs
    else if srcType == "tarball" then builtins.fetchTarball srcArgs
    else if srcType == "git" then builtins.fetchGit (fromJSON srcArgs)
    else throw "nixery: unknown package source type '${srcType}'";

  # The nixpkgs config is the registry's alone: passing config and overlays keeps
  # nixpkgs from reading them from the server's HOME, NIXPKGS_CONFIG or NIX_PATH.
  # The file may hold a function of { pkgs, lib, ... } as nixpkgs allows.
  fileConfig = if nixpkgsConfig == "" then { } else import nixpkgsConfig;
  forced = { allowUnfree = allowUnfree == "true"; };
  config =
    if isFunction fileConfig then args: fileConfig args // forced
    else fileConfig // forced;

  pkgs = import source { inherit system config; overlays = [ ]; };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = replaceStrings upper lower;

  # Registry names are lower case, attribute names often are not (bashInteractive),
  # and nixpkgs prefixes names that start with a digit with an underscore (_1password).
  candidates = comp:
    [ comp ] ++ (if match "[0-9].*" comp != null then [ "_${comp}" ] else [ ]);

  lookupExact = set: names:
    if names == [ ] then null
    else if hasAttr (head names) set then set.${head names}
    else lookupExact set (tail names);

  lookupFolded = set: names:
    let
      folded = map toLower names;
      hits = filter (n: builtins.elem (toLower n) folded) (attrNames set);
    in if hits == [ ] then null else set.${head hits};

  lookup = set: comp:
    let exact = lookupExact set (candidates comp);
    in if exact != null then exact else lookupFolded set (candidates comp);

  components = name: filter (c: builtins.isString c) (split "\\." name);

  resolvePath = set: comps:
    if comps == [ ] then set
    else if !(isAttrs set) then null
    else
      let next = lookup set (head comps);
      in if next == null then null else resolvePath next (tail comps);

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  resolve = name: { inherit name; value = resolvePath pkgs (components name); };
  # Optional packages (cacert, iana-etc) join the image only where the set has them.
  optionals = filter (r: r.value != null && isDerivation r.value) (map resolve (fromJSON optional));

  # meta is read for the SBOM only; a package whose meta does not evaluate still builds.
  metaOf = v: let m = builtins.tryEval (v.meta or { }); in if m.success && isAttrs m.value then m.value else { };
  # SPDX ids where nixpkgs has one; its other licenses as SPDX license references.
  licenseId = l:
    if isAttrs l then
      (l.spdxId or (if l ? shortName then "LicenseRef-nixpkgs-${l.shortName}" else null))
    else if builtins.isString l then l
    else null;
  licensesOf = v:
    let
      l = (metaOf v).license or null;
      ids = map licenseId (if builtins.isList l then l else [ l ]);
      r = builtins.tryEval (builtins.deepSeq ids ids);
    in if r.success then filter builtins.isString r.value else [ ];
  homepageOf = v:
    let
      h = (metaOf v).homepage or null;
      first = if builtins.isList h then (if h == [ ] then null else head h) else h;
      r = builtins.tryEval first;
    in if r.success && builtins.isString r.value then r.value else null;

  describe = r: {
    inherit (r) name;
    drvPath = r.value.drvPath;
    output = r.value.outputName or "out";
    path = r.value.outPath;
    licenses = licensesOf r.value;
    homepage = homepageOf r.value;
  };
  infoOf = names:
    let
      resolved = map resolve names;
      missing = map (r: r.name) (filter (r: r.value == null) resolved);
      notPackages = map (r: r.name) (filter (r: r.value != null && !(isDerivation r.value)) resolved);
    in
    if missing != [ ] || notPackages != [ ] then { inherit missing notPackages; packages = [ ]; }
    else { missing = [ ]; notPackages = [ ]; packages = map describe (resolved ++ optionals); };

  tried = names:
    let
      info = infoOf names;
      r = builtins.tryEval (builtins.deepSeq info info);
    in if r.success then { ok = true; info = r.value; } else { ok = false; };
in
{
  info = infoOf (fromJSON packages);
  batch = map tried (fromJSON requests);
}

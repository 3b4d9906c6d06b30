{
  lib,
  buildPythonPackage,

  # build-system
  setuptools,

  # dependencies
  aiohttp,
  bcrypt,
  httptools,
  prometheus-client,
  pyyaml,
  uvloop,

  # tests
  hypothesis,
  prometheus,
  pytest-aiohttp,
  pytestCheckHook,
  trustme,
}:

let
  pyproject = lib.importTOML ./pyproject.toml;

  # The Python project is pkgs/aegis/, but its tests are in tests/ at the
  # repository root, and tests/test_readme.py checks README.md and docs/
  # against the code, CI's script and .gitignore, so the source is the
  # repository cut down to those. The Nix files are left out, so that
  # editing them does not rebuild the package, and so are tests/test_nix.py
  # and tests/test_systemd.py, which check those Nix files and need tools
  # (nix-instantiate, root, systemd-nspawn) the build sandbox does not have.
  # Bytecode the tests leave beside the sources.
  bytecode = lib.fileset.fileFilter (file: file.hasExt "pyc");
  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../README.md
      ../../docs
      ../../.ci/run
      ../../.gitignore
      (lib.fileset.difference ./. (
        lib.fileset.unions [
          ./default.nix
          # What `pip install -e` leaves in a checkout: a flake's source holds
          # only what git tracks, but callPackage on a checkout takes the
          # directory as it is.
          (lib.fileset.maybeMissing ./aegis.egg-info)
          (lib.fileset.maybeMissing ./build)
          (bytecode ./.)
        ]
      ))
      (lib.fileset.difference ../../tests (
        lib.fileset.unions [
          ../../tests/test_nix.py
          ../../tests/test_systemd.py
          (lib.fileset.fileFilter (file: file.hasExt "nix") ../../tests)
          (bytecode ../../tests)
        ]
      ))
    ];
  };
in
buildPythonPackage {
  pname = "aegis";
  inherit (pyproject.project) version;
  pyproject = true;

  inherit src;
  sourceRoot = "${src.name}/pkgs/aegis";

  build-system = [ setuptools ];

  dependencies = [
    aiohttp
    bcrypt
    httptools
    prometheus-client
    pyyaml
    uvloop
  ];

  nativeCheckInputs = [
    hypothesis # the property-based part of tests/test_chaos.py
    # prometheus and promtool, for the end-to-end tests that scrape through
    # Aegis; nixpkgs moves promtool to prometheus' cli output
    prometheus
    prometheus.cli
    pytest-aiohttp
    pytestCheckHook
    trustme
  ];

  # Run from the repository root: that is where tests/ is, and there no
  # aegis/ source directory shadows the installed package, so the tests
  # exercise what was installed. The command-line tests start the installed
  # `aegis` executable.
  preCheck = ''
    export PATH="$out/bin:$PATH"
    pushd ../..
  '';
  postCheck = ''
    popd
  '';

  # As a developer runs them: `pytest tests` from the repository root, which
  # picks up tests/pytest.ini. unpackPhase made only sourceRoot writable, so
  # pytest's cache, which would go in tests/, is turned off.
  enabledTestPaths = [ "tests" ];
  pytestFlags = [
    "-p"
    "no:cacheprovider"
  ];

  pythonImportsCheck = [ "aegis" ];

  meta = {
    description = "Expose the Prometheus metrics of services that listen on Unix sockets through one TCP port";
    license = lib.licenses.mit;
    mainProgram = "aegis";
    # os.sched_getaffinity, SO_REUSEPORT load balancing, systemd sockets
    platforms = lib.platforms.linux;
  };
}

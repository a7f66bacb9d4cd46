# Shared by scripts/test.sh and scripts/cluster-test.sh (sourced, not run).

# install_and_setup CALLER PACKAGE...: apt-get install the Debian packages named (as root;
# otherwise say what to install and fail), then install this package with its test extra.
install_and_setup() {
    local caller=$1
    shift
    if (($#)); then
        if [[ $(id -u) != 0 ]]; then
            echo "$caller: missing packages; install them first:" >&2
            echo "    sudo apt-get install -y $*" >&2
            exit 1
        fi
        echo "$caller: installing $*" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q "$@"
    fi
    python -m pip install -q -e ".[test]"
}

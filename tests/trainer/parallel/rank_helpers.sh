# Shared by the scripts that signal one rank of a running `mpirun ... dsx train` (sourced; they
# define fail()).

# Waits (up to 60 s) until OUT holds COUNT step lines: training is under way.
wait_for_steps() {
  _i=0
  until [ "$(grep -c '^step' "$1" 2>/dev/null)" -ge "$2" ]; do
    _i=$((_i + 1)); [ "$_i" -le 600 ] || fail "training did not start"; sleep 0.1
  done
}

# Prints the pid of the `DSX train RECIPE` process of world rank RANK (empty when none).
rank_pid() {
  for _p in $(pgrep -f "$1 train $2"); do
    if tr '\0' '\n' <"/proc/$_p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$3"; then echo "$_p"; fi
  done
}

/* cli.h: what the meshgate-cli commands share. Single-threaded tool. */
#ifndef MG_CLI_H
#define MG_CLI_H

/* Exit codes. */
#define MG_CLI_OK    0
#define MG_CLI_RPC   1 /* the call failed (or the answer was negative) */
#define MG_CLI_USAGE 2

/* `listen --user U [--ws URL] [--token JWT] [--count N] [--seconds S]`:
 * prints each server frame as one line. Returns an exit code. */
int mg_cli_listen(int argc, char **argv);

#endif

/* Prints the settings reference (Markdown) generated from the config table;
 * `make docs` splices it into README.md and docs/configuration.md. */
#include <stdio.h>

#include "tidepool/config.h"

int main(void)
{
    tp_config_print_reference(stdout);
    return 0;
}

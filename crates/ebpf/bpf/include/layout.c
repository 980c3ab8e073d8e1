/* Built and run on the host by build.rs: prints the size and the field offsets of every map
 * struct in dcnet_lb.h as Rust, for the test that holds the Rust mirrors to them. */
#include <stddef.h>
#include <stdio.h>

#include "dcnet_lb.h"

#define SIZE(t) printf("    (\"%s\", %zu),\n", #t, sizeof(struct t))
#define FIELD(t, f) printf("    (\"%s.%s\", %zu),\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	printf("/// Sizes and field offsets of the map structs in dcnet_lb.h, as the C compiler lays them out.\n");
	printf("pub(crate) const C_LAYOUT: &[(&str, usize)] = &[\n");
	SIZE(dcnet_addr);
	SIZE(dcnet_service_key);
	FIELD(dcnet_service_key, port);
	FIELD(dcnet_service_key, proto);
	SIZE(dcnet_service);
	FIELD(dcnet_service, flags);
	FIELD(dcnet_service, slots);
	SIZE(dcnet_backend);
	FIELD(dcnet_backend, port);
	SIZE(dcnet_reverse_key);
	FIELD(dcnet_reverse_key, ip);
	FIELD(dcnet_reverse_key, port);
	SIZE(dcnet_reverse);
	FIELD(dcnet_reverse, port);
	printf("    (\"DCNET_MAX_SLOTS\", %d),\n", DCNET_MAX_SLOTS);
	printf("    (\"DCNET_SVC_MAGLEV\", %u),\n", DCNET_SVC_MAGLEV);
	printf("];\n");
	return 0;
}

/* mg_id.c: UUIDv7 generation (see mg_id.h). */
#include "common/mg_id.h"
#include "common/mg_time.h"

#include <stdint.h>
#include <sys/random.h>

static __thread uint64_t rng_state;

/* xorshift64* seeded from getrandom() once per thread: ids need uniqueness,
 * not secrecy, and a syscall per id would cost more than the rest of a send. */
uint64_t mg_random64(void)
{
    if (rng_state == 0) {
        if (getrandom(&rng_state, sizeof(rng_state), 0) != sizeof(rng_state) || rng_state == 0)
            rng_state = (uint64_t)mg_mono_us() ^ (uint64_t)(uintptr_t)&rng_state;
        rng_state |= 1;
    }
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

void mg_id_new(char out[MG_ID_LEN + 1])
{
    uint8_t b[16];
    uint64_t ms = (uint64_t)mg_now_ms();
    for (int i = 0; i < 6; i++)
        b[i] = (uint8_t)(ms >> (40 - 8 * i));
    uint64_t r1 = mg_random64(), r2 = mg_random64();
    for (int i = 0; i < 2; i++)
        b[6 + i] = (uint8_t)(r1 >> (8 * i));
    for (int i = 0; i < 8; i++)
        b[8 + i] = (uint8_t)(r2 >> (8 * i));
    b[6] = (uint8_t)(0x70 | (b[6] & 0x0f)); /* version 7 */
    b[8] = (uint8_t)(0x80 | (b[8] & 0x3f)); /* variant 10 */
    /* by hand: snprintf's format parsing was 2% of a SendStream message's CPU */
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        *p++ = hex[b[i] >> 4];
        *p++ = hex[b[i] & 0x0f];
    }
    *p = '\0';
}

/* Guest-side workload for benchmarks/migrate_bench.py: rewrite N MiB of anonymous memory for
 * ever, one store per 4 KiB page per sweep, so every page stays dirty for the migration. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv)
{
    long mib = argc > 1 ? atol(argv[1]) : 4;
    if (mib <= 0 || mib > 4096) {
        fprintf(stderr, "dirtier: MiB out of range\n");
        return 2;
    }
    size_t size = (size_t)mib << 20;
    volatile unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        perror("dirtier: mmap");
        return 1;
    }
    printf("KVMPY-DIRTIER %ld MiB\n", mib);
    fflush(stdout);
    /* a line every ~2 s: the benchmark checks that the workload ran through the migration (a
     * dirtier that died part way would let a VMM converge on an idle guest) */
    time_t said = time(NULL);
    for (unsigned long round = 0;; round++) {
        for (size_t off = 0; off < size; off += 4096)
            p[off] = (unsigned char)round;
        time_t now = time(NULL);
        if (now - said >= 2) {
            printf("KVMPY-DIRTIER-ALIVE %lu\n", round);
            fflush(stdout);
            said = now;
        }
    }
}

/* blkbench: block-device read benchmark run inside a guest (gcc -static).
 *
 *   blkbench seq  DEV SECONDS [MIB]   1 MiB O_DIRECT preads from offset 0 (wrapping at the end
 *                                     of the device) until MIB are read or SECONDS pass
 *   blkbench rand DEV SECONDS [COUNT] 4 KiB O_DIRECT preads at queue depth 1, offsets from a
 *                                     fixed-seed xorshift64*, until COUNT reads or SECONDS pass
 *
 * Prints one line: "BLKBENCH <mode> bytes=N ios=N secs=F mbps=F iops=F bad=N". Every 4 KiB block
 * of the test image starts with its own index XOR TAG_MAGIC (blk_bench.py writes it), so each
 * read is checked: `bad` counts blocks whose tag is wrong (a VMM that returns wrong data fails).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define SEQ_CHUNK (1u << 20)
#define TAG_MAGIC 0x6b766d7079626c6bULL /* "kvmpyblk" */
#define RAND_SEED 0x2545f4914f6cdd1dULL

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t check_blocks(const unsigned char *buf, size_t len, uint64_t first_block)
{
	uint64_t bad = 0;
	for (size_t off = 0; off + BLOCK <= len; off += BLOCK) {
		uint64_t tag;
		memcpy(&tag, buf + off, sizeof tag);
		if ((tag ^ TAG_MAGIC) != first_block + off / BLOCK)
			bad++;
	}
	return bad;
}

static uint64_t xorshift64s(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static void report(const char *mode, uint64_t bytes, uint64_t ios, double secs, uint64_t bad)
{
	double mbps = secs > 0 ? (double)bytes / secs / 1e6 : 0.0;
	double iops = secs > 0 ? (double)ios / secs : 0.0;
	printf("BLKBENCH %s bytes=%llu ios=%llu secs=%.4f mbps=%.2f iops=%.1f bad=%llu\n", mode,
	       (unsigned long long)bytes, (unsigned long long)ios, secs, mbps, iops,
	       (unsigned long long)bad);
	fflush(stdout);
}

static int fail(const char *what, const char *dev)
{
	fprintf(stderr, "blkbench: %s %s: %s\n", what, dev, strerror(errno));
	printf("BLKBENCH-ERROR %s\n", what);
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 4 || (strcmp(argv[1], "seq") && strcmp(argv[1], "rand"))) {
		fprintf(stderr, "usage: blkbench seq|rand DEV SECONDS [MIB|COUNT]\n");
		return 2;
	}
	const char *mode = argv[1], *dev = argv[2];
	double limit_s = atof(argv[3]);
	uint64_t cap = argc > 4 ? strtoull(argv[4], NULL, 0) : 0;
	if (limit_s <= 0) {
		fprintf(stderr, "blkbench: SECONDS must be positive\n");
		return 2;
	}
	int fd = open(dev, O_RDONLY | O_DIRECT);
	if (fd < 0)
		return fail("open", dev);
	uint64_t dev_bytes = 0;
	if (ioctl(fd, BLKGETSIZE64, &dev_bytes) < 0) {
		off_t end = lseek(fd, 0, SEEK_END);
		if (end < 0)
			return fail("size", dev);
		dev_bytes = (uint64_t)end;
	}
	if (dev_bytes < SEQ_CHUNK) {
		fprintf(stderr, "blkbench: %s is smaller than 1 MiB\n", dev);
		return 1;
	}
	unsigned char *buf;
	if (posix_memalign((void **)&buf, BLOCK, SEQ_CHUNK))
		return fail("alloc", dev);
	memset(buf, 0, SEQ_CHUNK);

	uint64_t bytes = 0, ios = 0, bad = 0;
	double start = now_s(), elapsed = 0;
	if (!strcmp(mode, "seq")) {
		uint64_t span = dev_bytes - dev_bytes % SEQ_CHUNK;
		while ((!cap || bytes < cap * SEQ_CHUNK) && elapsed < limit_s) {
			uint64_t off = bytes % span; /* wrap: a fast device makes several passes */
			ssize_t n = pread(fd, buf, SEQ_CHUNK, (off_t)off);
			if (n != (ssize_t)SEQ_CHUNK)
				return fail("pread", dev);
			bad += check_blocks(buf, SEQ_CHUNK, off / BLOCK);
			bytes += SEQ_CHUNK;
			ios++;
			elapsed = now_s() - start;
		}
	} else {
		uint64_t blocks = dev_bytes / BLOCK, state = RAND_SEED;
		while ((!cap || ios < cap) && elapsed < limit_s) {
			uint64_t block = xorshift64s(&state) % blocks;
			ssize_t n = pread(fd, buf, BLOCK, (off_t)(block * BLOCK));
			if (n != (ssize_t)BLOCK)
				return fail("pread", dev);
			bad += check_blocks(buf, BLOCK, block);
			bytes += BLOCK;
			ios++;
			elapsed = now_s() - start;
		}
	}
	report(mode, bytes, ios, elapsed, bad);
	free(buf);
	close(fd);
	return bad ? 3 : 0;
}

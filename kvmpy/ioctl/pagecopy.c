/* Live migration's page copies in C (appended to kvmpy.ioctl._kvm's SOURCE by _build.py; the
   numpy code in kvmpy/migrate/pages.py is the reference, compared byte for byte in tier 0).

   Why: a live pass copies every dirty page once on each side: the source gathers it (crc and data
   must agree while the guest writes) and the destination puts it in place. numpy copies a 4 KiB
   row with glibc's memmove, which takes `rep movsb` at that size, and QEMU's TCG (the nested
   harness's L1) runs that instruction a byte at a time: 27-30 us a page there, against 4-5 for
   16-byte SSE2 moves, with the pass bounded by the CPU. The zero test rides on the copy's loads.
   Page numbers come checked by the caller (against the range they index), except in
   kvmpy_pages_place, which checks the run table a stream brought before writing a page. */
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define KVMPY_PAGE 4096

/* Copy one page; nonzero: it held a non-zero byte (as copied: the copy is what is sent). */
static int kvmpy_page_copy(uint8_t *dst, const uint8_t *src)
{
#if defined(__SSE2__)
    __m128i any = _mm_setzero_si128();
    for (int i = 0; i < KVMPY_PAGE; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_storeu_si128((__m128i *)(dst + i), a);
        _mm_storeu_si128((__m128i *)(dst + i + 16), b);
        _mm_storeu_si128((__m128i *)(dst + i + 32), c);
        _mm_storeu_si128((__m128i *)(dst + i + 48), d);
        any = _mm_or_si128(any, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
    }
    return _mm_movemask_epi8(_mm_cmpeq_epi8(any, _mm_setzero_si128())) != 0xFFFF;
#else
    uint64_t any = 0, w;
    for (int i = 0; i < KVMPY_PAGE; i += 8) {
        memcpy(&w, src + i, 8);
        memcpy(dst + i, &w, 8);
        any |= w;
    }
    return any != 0;
#endif
}

/* Pages pages[0..n) of base, the non-zero ones copied into out one after another (out holds n
   pages: a zero page's copy is overwritten by the next); zero[i] = 1 when page i was zero.
   Returns how many pages out holds. */
uint64_t kvmpy_pages_gather(const uint8_t *base, const int64_t *pages, uint64_t n, uint8_t *out, uint8_t *zero)
{
    uint64_t held = 0;
    for (uint64_t i = 0; i < n; i++) {
        int data = kvmpy_page_copy(out + held * KVMPY_PAGE, base + (uint64_t)pages[i] * KVMPY_PAGE);
        zero[i] = !data;
        held += data;
    }
    return held;
}

/* Zero npages pages at dst (16-byte stores: glibc's memset takes `rep stosb`, slow under TCG). */
static void kvmpy_pages_zero(uint8_t *dst, uint64_t npages)
{
    for (uint64_t k = 0; k < npages * KVMPY_PAGE; k += 16) {
#if defined(__SSE2__)
        _mm_storeu_si128((__m128i *)(dst + k), _mm_setzero_si128());
#else
        memset(dst + k, 0, 16);
#endif
    }
}

/* The stream's data hash (format 2; kvmpy.migrate.pages.data_hash, whose numpy code is the
   reference): per page, four lanes of lane = (lane ^ word) * P1 over its 512 little-endian u64
   words, folded with rotations; pages chained in order by h = (rotl(h, 23) ^ page) * P2. Every
   step is a bijection, so one changed word always changes h. Why not crc32: in L1 zlib's crc32
   cost 14-20 us a page on each side of a live pass, this ~3. */
#define KVMPY_H_P1 0x9E3779B185EBCA87ull
#define KVMPY_H_P2 0xC2B2AE3D27D4EB4Full
#define KVMPY_H_P3 0x165667B19E3779F9ull

static inline uint64_t kvmpy_rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static uint64_t kvmpy_page_hash(const uint8_t *p)
{
    uint64_t a = KVMPY_H_P1, b = KVMPY_H_P2, c = KVMPY_H_P3, d = KVMPY_H_P1 ^ KVMPY_H_P2, w[4];
    for (int i = 0; i < KVMPY_PAGE; i += 32) {
        memcpy(w, p + i, 32);
        a = (a ^ w[0]) * KVMPY_H_P1;
        b = (b ^ w[1]) * KVMPY_H_P1;
        c = (c ^ w[2]) * KVMPY_H_P1;
        d = (d ^ w[3]) * KVMPY_H_P1;
    }
    return a ^ kvmpy_rotl(b, 16) ^ kvmpy_rotl(c, 32) ^ kvmpy_rotl(d, 48);
}

/* h chained with the hashes of npages whole pages at data. */
uint64_t kvmpy_pages_hash(uint64_t h, const uint8_t *data, uint64_t npages)
{
    for (uint64_t i = 0; i < npages; i++)
        h = (kvmpy_rotl(h, 23) ^ kvmpy_page_hash(data + i * KVMPY_PAGE)) * KVMPY_H_P2;
    return h;
}

/* A dirty pass's next chunk, straight from its dirty mask (kvmpy.migrate.pages.pack_marked,
   whose numpy path is the reference): mask[i] non-zero marks page first + i of base. The marked
   pages are taken in order until max_pages of them: each is copied to out (the non-zero ones one
   after another, as kvmpy_pages_gather), its zero test made on the copy, the chunk's run table
   built as it goes (table[2k] = first page, table[2k + 1] = count | zero_flag for a zero run;
   a run is cut where pages stop being consecutive or change between zero and data) and the data
   pages chained into *hash as kvmpy_pages_hash would. result[0] = data pages in out,
   result[1] = table rows, result[2] = pages taken. Returns how many mask entries were consumed
   (the next call starts there). Why one call: per chunk, the runs, page numbers, gather, cuts and
   table were a dozen numpy calls, ~20 us a page of a live pass under nested TCG. The caller
   checks that pages first .. first + n - 1 lie in base. */
uint64_t kvmpy_pages_pack(const uint8_t *base, const uint8_t *mask, uint64_t n, uint64_t first,
                          uint64_t max_pages, uint32_t zero_flag, uint8_t *out, uint32_t *table,
                          uint64_t *result, uint64_t *hash)
{
    uint64_t held = 0, rows = 0, taken = 0, i = 0, h = *hash;
    uint64_t run_end = 0;           /* page after the last row's run */
    int run_zero = 0;
    while (i < n) {
        if (mask[i] == 0) {         /* skip clean pages eight at a time */
            uint64_t w;
            if (i + 8 <= n) {
                memcpy(&w, mask + i, 8);
                if (w == 0) {
                    i += 8;
                    continue;
                }
            }
            i++;
            continue;
        }
        if (taken == max_pages)
            break;
        uint64_t page = first + i;
        uint8_t *dst = out + held * KVMPY_PAGE;
        int data = kvmpy_page_copy(dst, base + page * KVMPY_PAGE);
        if (data) {
            h = (kvmpy_rotl(h, 23) ^ kvmpy_page_hash(dst)) * KVMPY_H_P2;
            held++;
        }
        if (rows && run_end == page && run_zero == !data) {
            table[2 * rows - 1]++;
        } else {
            table[2 * rows] = (uint32_t)page;
            table[2 * rows + 1] = 1u | (data ? 0u : zero_flag);
            rows++;
            run_zero = !data;
        }
        run_end = page + 1;
        taken++;
        i++;
    }
    result[0] = held;
    result[1] = rows;
    result[2] = taken;
    *hash = h;
    return i;
}

/* The destination's side of a chunk, from its run table as the reader checked it: rows
   table[3k .. 3k + 2] = first page, count, zero; a data run's pages come from data in order, a
   zero run's are zeroed. Every row is checked against the range's npages, and the data runs
   against the ndata pages of data, before a page is written: -1 and nothing written when one
   does not fit. Why one call: per chunk, the page numbers of both kinds of run and their checks
   were a dozen numpy calls (kvmpy.migrate.pages.scatter_pages keeps them as the reference). */
int kvmpy_pages_place(uint8_t *base, uint64_t npages, const int64_t *table, uint64_t nrows,
                      const uint8_t *data, uint64_t ndata)
{
    uint64_t want = 0;
    for (uint64_t k = 0; k < nrows; k++) {
        int64_t first = table[3 * k], count = table[3 * k + 1];
        if (first < 0 || count < 0 || (uint64_t)first > npages || (uint64_t)count > npages - (uint64_t)first)
            return -1;
        if (!table[3 * k + 2])
            want += (uint64_t)count;
    }
    if (want != ndata)
        return -1;
    for (uint64_t k = 0; k < nrows; k++) {
        uint64_t first = (uint64_t)table[3 * k], count = (uint64_t)table[3 * k + 1];
        if (table[3 * k + 2]) {
            kvmpy_pages_zero(base + first * KVMPY_PAGE, count);
            continue;
        }
        for (uint64_t i = 0; i < count; i++, data += KVMPY_PAGE)
            kvmpy_page_copy(base + (first + i) * KVMPY_PAGE, data);
    }
    return 0;
}

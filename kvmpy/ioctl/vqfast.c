/* The virtio-blk data path in C (appended to kvmpy.ioctl._kvm's SOURCE by _build.py).

   kvmpy_vq_pop mirrors kvmpy.devices.virtio.queue.Virtqueue.pop check for check, message for
   message: everything in the rings is guest-written. kvmpy_blk_run mirrors VirtioBlk's plain
   T_IN/T_OUT path (header and status byte in descriptors of their own) and hands every other
   popped chain back to Python, so the Python code stays the one definition of the rest.
   Calls come through cffi, which releases the GIL: vCPU threads run while a request is in the
   kernel. The Python Virtqueue stays authoritative: it passes last_avail_idx/used_idx in and
   reads them back after each call. */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

#define KVMPY_VQ_F_NEXT 1
#define KVMPY_VQ_F_WRITE 2
#define KVMPY_VQ_F_INDIRECT 4
#define KVMPY_VQ_MAX_CHAIN ((uint64_t)1 << 32)
#define KVMPY_BLK_HDR 16
#define KVMPY_BLK_SECTOR 512
#define KVMPY_BLK_ALIGN 4096
#define KVMPY_BLK_IOV_MAX 1024
#define KVMPY_BLK_T_IN 0
#define KVMPY_BLK_T_OUT 1
#define KVMPY_BLK_S_OK 0
#define KVMPY_BLK_S_IOERR 1

#include "vqfast.h"

static int kvmpy_vq_fail(struct kvmpy_vq *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->msg, sizeof q->msg, fmt, ap);
    va_end(ap);
    return KVMPY_VQ_ERROR;
}

static inline uint16_t kvmpy_ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint16_t kvmpy_ld16_acquire(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void kvmpy_st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* Host address of [gpa, gpa+len) when it lies inside one RAM range (GuestMemory.contains). */
static inline uint8_t *kvmpy_vq_hva(const struct kvmpy_vq *q, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < q->nram; i++) {
        const struct kvmpy_ram *r = &q->ram[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

/* Set the userspace dirty-map byte of every page of [gpa, gpa+len) (after the device wrote it):
   plain byte stores of 1, never read-modify-write, so Python's marks and clears (which hold the
   GIL, while this runs without it) lose nothing. See kvmpy.memslots.memory. */
static void kvmpy_vq_mark(const struct kvmpy_vq *q, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        return;
    for (uint32_t i = 0; i < q->nram; i++) {
        const struct kvmpy_ram *r = &q->ram[i];
        if (r->dirty != NULL && gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t first = (gpa - r->gpa) >> 12;
            uint64_t end = gpa - r->gpa + len;
            uint64_t last = ((end < r->size ? end : r->size) + 4095) >> 12;
            for (uint64_t p = first; p < last; p++)
                ((volatile uint8_t *)r->dirty)[p] = 1;
            return;
        }
    }
}

static int kvmpy_vq_walk(struct kvmpy_vq *q, uint32_t head, struct kvmpy_chain *c)
{
    uint32_t size = q->size;
    if (head >= size)
        return kvmpy_vq_fail(q, "head index %u >= size %u", head, size);
    const uint8_t *table = q->desc;
    uint32_t table_len = size, idx = head, count = 0, n = 0, nread = 0;
    int in_indirect = 0;
    uint64_t total = 0, wlen = 0;
    for (;;) {
        if (idx >= table_len)
            return kvmpy_vq_fail(q, "next index %u >= table length %u", idx, table_len);
        if (++count > table_len)
            return kvmpy_vq_fail(q, "descriptor chain loops or exceeds the table");
        const uint8_t *d = table + ((size_t)idx << 4);
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & KVMPY_VQ_F_INDIRECT) {
            if (!q->indirect || in_indirect || (flags & KVMPY_VQ_F_NEXT))
                return kvmpy_vq_fail(q, "indirect descriptor not allowed here (flags 0x%x)", flags);
            if (len == 0 || (len & 15) || (len >> 4) > size)
                return kvmpy_vq_fail(q, "indirect table length %u invalid", len);
            const uint8_t *t = kvmpy_vq_hva(q, addr, len);
            if (t == NULL)
                return kvmpy_vq_fail(q, "indirect table [0x%llx+%u] outside RAM", (unsigned long long)addr, len);
            table = t;
            table_len = len >> 4;
            in_indirect = 1;
            idx = 0;
            count = 0;
            continue;
        }
        uint8_t *h = kvmpy_vq_hva(q, addr, len);
        if (h == NULL)
            return kvmpy_vq_fail(q, "buffer [0x%llx+%u] outside RAM", (unsigned long long)addr, len);
        total += len;
        if (flags & KVMPY_VQ_F_WRITE)
            wlen += len;
        else if (n > nread)
            return kvmpy_vq_fail(q, "readable descriptor after a writable one");
        else
            nread++;
        /* n < 2 * size: at most size - 1 ring descriptors before an indirect one, size in it */
        c->gpa[n] = addr;
        c->len[n] = len;
        c->iov[n].iov_base = h;
        c->iov[n].iov_len = len;
        n++;
        if (!(flags & KVMPY_VQ_F_NEXT)) {
            if (total > KVMPY_VQ_MAX_CHAIN)
                return kvmpy_vq_fail(q, "chain longer than 4 GiB");
            c->head = head;
            c->nseg = n;
            c->nread = nread;
            c->readable_len = total - wlen;
            c->writable_len = wlen;
            return KVMPY_VQ_CHAIN;
        }
        idx = next;
    }
}

/* Virtqueue.pop: the next available chain into *c, or EMPTY, or ERROR (nothing consumed). */
static int kvmpy_vq_pop(struct kvmpy_vq *q, struct kvmpy_chain *c)
{
    uint32_t size = q->size;
    uint8_t *avail_event = q->used + 4 + 8 * (size_t)size;
    uint16_t pending = (uint16_t)(kvmpy_ld16_acquire(q->avail + 2) - q->last_avail_idx);
    if (pending == 0) {
        if (!q->event_idx)
            return KVMPY_VQ_EMPTY;
        /* Publish where we stopped, then look once more so a racing driver is not missed. */
        kvmpy_st16_release(avail_event, q->last_avail_idx);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        pending = (uint16_t)(kvmpy_ld16_acquire(q->avail + 2) - q->last_avail_idx);
        if (pending == 0)
            return KVMPY_VQ_EMPTY;
    }
    if (pending > size)
        return kvmpy_vq_fail(q, "avail index jumped %u entries ahead (size %u)", pending, size);
    uint16_t head = kvmpy_ld16(q->avail + 4 + 2 * (size_t)(q->last_avail_idx & (size - 1)));
    int r = kvmpy_vq_walk(q, head, c);
    if (r != KVMPY_VQ_CHAIN)
        return r;
    q->last_avail_idx++;
    if (q->event_idx)
        kvmpy_st16_release(avail_event, q->last_avail_idx);
    return KVMPY_VQ_CHAIN;
}

/* Virtqueue.push: the used element, then the used index the driver reads. */
static void kvmpy_vq_push(struct kvmpy_vq *q, uint32_t head, uint64_t written, uint64_t writable_len)
{
    uint32_t w = (uint32_t)(written < writable_len ? written : writable_len);
    uint8_t *e = q->used + 4 + 8 * (size_t)(q->used_idx & (q->size - 1));
    memcpy(e, &head, 4);
    memcpy(e + 4, &w, 4);
    q->used_idx++;
    kvmpy_st16_release(q->used + 2, q->used_idx);
}

/* VirtioBlk._rw's transfer loop over iov[0..n): O_DIRECT when everything is 4 KiB aligned, the
   page cache when the kernel refuses it (EINVAL) or after a short unaligned transfer; short
   transfers continue where they stopped. Returns the status byte. */
static int kvmpy_blk_transfer(struct kvmpy_blk *b, const uint64_t *gpa, const uint32_t *len,
                              struct iovec *iov, uint32_t n, uint64_t offset, int write)
{
    int fd = b->fd;
    if (b->direct_fd >= 0 && offset % KVMPY_BLK_ALIGN == 0) {
        uint64_t bits = 0;
        for (uint32_t i = 0; i < n; i++)
            bits |= gpa[i] | len[i];
        if (bits % KVMPY_BLK_ALIGN == 0) {
            fd = b->direct_fd;  /* guest RAM is page-aligned host memory: GPA alignment carries over */
            b->direct_reqs++;
        }
    }
    while (n > 0) {
        int batch = n < KVMPY_BLK_IOV_MAX ? (int)n : KVMPY_BLK_IOV_MAX;
        ssize_t done = write ? pwritev(fd, iov, batch, (off_t)offset) : preadv(fd, iov, batch, (off_t)offset);
        if (done < 0) {
            int e = errno;
            if (e == EINTR)
                continue;
            if (fd == b->fd || e != EINVAL) {
                b->io_errno = e;
                b->io_write = write;
                return KVMPY_BLK_S_IOERR;
            }
            b->direct_errno = e;    /* Python logs it and closes the O_DIRECT fd */
            b->direct_fd = -1;
            fd = b->fd;
            continue;
        }
        if (done == 0) {
            b->io_errno = EIO;
            b->io_short = 1;
            b->io_write = write;
            return KVMPY_BLK_S_IOERR;
        }
        offset += (uint64_t)done;
        if (done % KVMPY_BLK_ALIGN)
            fd = b->fd;         /* a short O_DIRECT transfer leaves an unaligned rest */
        size_t left = (size_t)done;
        while (n > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (left) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return KVMPY_BLK_S_OK;
}

/* Mark the image's blocks that [offset, offset+len) touched (after the write, whatever its
   status: a failed write may have written part). Plain byte stores of 1, as kvmpy_vq_mark:
   kvmpy_dirty_take exchanges whole words atomically, so no mark is ever lost. */
static void kvmpy_blk_mark(const struct kvmpy_blk *b, uint64_t offset, uint64_t len)
{
    uint8_t *map = b->dirty;
    if (map == NULL || len == 0)
        return;
    uint64_t first = offset >> b->block_shift;
    uint64_t last = (offset + len - 1) >> b->block_shift;
    for (uint64_t i = first; i <= last && i < b->dirty_blocks; i++)
        ((volatile uint8_t *)map)[i] = 1;
}

/* Block migration's read-and-clear of a dirty map (a byte per block): copy map[0..n) into out
   and zero it, eight bytes at a time with an atomic exchange, so a mark set concurrently (the
   C data path runs without the GIL) lands either in this take or in the map for the next one.
   Returns how many bytes were set. */
uint64_t kvmpy_dirty_take(uint8_t *map, uint8_t *out, uint64_t n)
{
    uint64_t count = 0, i = 0;
    for (; i < n && ((uintptr_t)(map + i) & 7); i++) {
        out[i] = __atomic_exchange_n(map + i, 0, __ATOMIC_SEQ_CST);
        count += out[i] != 0;
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t *word = (uint64_t *)(map + i);
        uint64_t v = __atomic_load_n(word, __ATOMIC_RELAXED) ? __atomic_exchange_n(word, 0, __ATOMIC_SEQ_CST) : 0;
        memcpy(out + i, &v, 8);
        for (int k = 0; v && k < 8; k++, v >>= 8)
            count += (v & 0xff) != 0;
    }
    for (; i < n; i++) {
        out[i] = __atomic_exchange_n(map + i, 0, __ATOMIC_SEQ_CST);
        count += out[i] != 0;
    }
    return count;
}

/* VirtioBlk.process_queue for plain reads and writes: pop, check, transfer, status byte, used
   element, used index, until the ring is empty (EMPTY), a popped chain needs Python (CHAIN, left
   in *c, not pushed), a finished request has something to log (NOTE), or the ring is broken. */
static int kvmpy_blk_run(struct kvmpy_vq *q, struct kvmpy_blk *b, struct kvmpy_chain *c)
{
    b->pushed = 0;
    b->direct_errno = b->io_errno = b->io_short = b->io_write = 0;
    for (;;) {
        int r = kvmpy_vq_pop(q, c);
        if (r != KVMPY_VQ_CHAIN)
            return r;
        uint32_t n = c->nseg, nread = c->nread;
        /* the usual layout only: header alone in the first descriptor, status byte alone last */
        if (c->readable_len < KVMPY_BLK_HDR || c->writable_len < 1 || c->len[0] != KVMPY_BLK_HDR
            || c->len[n - 1] != 1)
            return KVMPY_VQ_CHAIN;
        uint32_t type;
        uint64_t sector;
        memcpy(&type, c->iov[0].iov_base, 4);
        memcpy(&sector, (const uint8_t *)c->iov[0].iov_base + 8, 8);
        uint32_t first, count;
        uint64_t nbytes;
        int write;
        if (type == KVMPY_BLK_T_IN) {
            first = nread, count = n - 1 - nread, nbytes = c->writable_len - 1, write = 0;
        } else if (type == KVMPY_BLK_T_OUT && !b->readonly) {
            first = 1, count = nread - 1, nbytes = c->readable_len - KVMPY_BLK_HDR, write = 1;
        } else {
            return KVMPY_VQ_CHAIN;
        }
        /* VirtioBlk._in_range; Python logs the refusal, so it answers those */
        if (nbytes % KVMPY_BLK_SECTOR || sector > b->capacity || nbytes / KVMPY_BLK_SECTOR > b->capacity - sector)
            return KVMPY_VQ_CHAIN;
        int status = KVMPY_BLK_S_OK;
        if (nbytes)
            status = kvmpy_blk_transfer(b, c->gpa + first, c->len + first, c->iov + first, count,
                                        sector * KVMPY_BLK_SECTOR, write);
        if (write)
            kvmpy_blk_mark(b, sector * KVMPY_BLK_SECTOR, nbytes);
        *(volatile uint8_t *)c->iov[n - 1].iov_base = (uint8_t)status;
        uint64_t written = (!write && status == KVMPY_BLK_S_OK) ? nbytes : 0;
        kvmpy_vq_push(q, c->head, written + 1, c->writable_len);
        for (uint32_t i = nread; i < n; i++)    /* what this request wrote into the guest */
            kvmpy_vq_mark(q, c->gpa[i], c->len[i]);
        b->pushed++;
        b->completed++;
        if (b->io_errno || b->direct_errno)
            return KVMPY_VQ_NOTE;
    }
}

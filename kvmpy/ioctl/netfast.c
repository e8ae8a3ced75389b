/* The virtio-net data path in C (appended after vqfast.c to kvmpy.ioctl._kvm's SOURCE by
   _build.py, so it walks rings with the same kvmpy_vq_pop/kvmpy_vq_push).

   Why: in userspace every received frame is a TAP read plus, with mergeable buffers, one popped
   chain per ~1.5-4 KiB of a 64 KiB GSO frame; each chain costs microseconds of Python (tens in
   the nested harness's L1), which bounded host->guest TCP. kvmpy_net_rx and kvmpy_net_tx do what
   VirtioNet's Python path (kvmpy/devices/virtio/netpath.py, the reference, compared byte for
   byte in tier 0) does, step for step, with the GIL released. Everything in the rings and
   every frame from the TAP is untrusted: chains are validated by kvmpy_vq_pop, lengths are
   checked before any copy, and a ring error consumes nothing more. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "netfast.h"

#define KVMPY_NET_HDR 12                      /* virtio_net_hdr_v1 */
#define KVMPY_NET_ETH 14
#define KVMPY_NET_MAX_FRAME (65535 + 14 + 4)  /* net.py's MAX_FRAME */
#define KVMPY_NET_F_NEEDS_CSUM 1
#define KVMPY_NET_GSO_ECN 0x80

static void kvmpy_net_clear(struct kvmpy_net *n)
{
    n->io_errno = 0;
    n->done = 0;
    n->rx_packets = n->rx_bytes = n->rx_dropped = n->rx_filtered = n->bad_buffers = 0;
    n->tx_packets = n->tx_bytes = n->tx_dropped = n->pushed = 0;
}

/* RxFilter.accepts as far as it needs no table: 1 accept, 0 refuse, -1 ask Python. */
static int kvmpy_net_filter(const struct kvmpy_net *n, const uint8_t *dest)
{
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (n->promisc)
        return 1;
    if (memcmp(dest, bcast, 6) == 0)
        return !n->nobcast;
    if (dest[0] & 1) {
        if (n->nomulti)
            return 0;
        return n->allmulti ? 1 : -1;
    }
    if (n->nouni)
        return 0;
    return (memcmp(dest, n->mac, 6) == 0 || n->alluni) ? 1 : -1;
}

/* Copy frame[pos, pos+take) into the popped chain's writable segments; remember where frame
   bytes 10 and 11 (num_buffers) landed. */
static void kvmpy_net_copy(struct kvmpy_vq *q, struct kvmpy_chain *c, const uint8_t *frame, uint64_t pos,
                           uint64_t take, uint8_t **nb)
{
    uint64_t end = pos + take;
    for (uint32_t i = c->nread; i < c->nseg && pos < end; i++) {
        uint64_t k = c->len[i] < end - pos ? c->len[i] : end - pos;
        if (k == 0)
            continue;
        uint8_t *dst = c->iov[i].iov_base;
        memcpy(dst, frame + pos, k);
        for (uint64_t b = 10; b < 12; b++)
            if (b >= pos && b < pos + k)
                nb[b - 10] = dst + (b - pos);
        kvmpy_vq_mark(q, c->gpa[i], k);
        pos += k;
    }
}

/* netpath.place: the frame into the next chain(s). NOBUF: not enough buffers (the avail index
   is put back, the frame stays); DRAINED here means placed or dropped; ERROR: ring broken. */
static int kvmpy_net_place(struct kvmpy_vq *q, struct kvmpy_net *n, struct kvmpy_chain *c)
{
    const uint8_t *frame = n->buf;
    uint64_t total = n->frame_len, room = 0;
    uint16_t start = q->last_avail_idx;
    uint32_t nchains = 0, njunk = 0, max = n->max_chains;
    uint32_t *junk = n->heads + max;          /* the second half of heads[] holds unusable chains */
    uint8_t *nb[2] = {NULL, NULL};
    while (room < total) {
        int r = kvmpy_vq_pop(q, c);
        if (r == KVMPY_VQ_ERROR)
            return r;
        if (r == KVMPY_VQ_EMPTY || nchains + njunk >= max) {
            q->last_avail_idx = start;
            return KVMPY_NET_NOBUF;
        }
        if (c->writable_len < KVMPY_NET_HDR) {
            junk[njunk++] = c->head;
            n->bad_buffers++;
            continue;
        }
        uint64_t take = c->writable_len < total - room ? c->writable_len : total - room;
        if (n->mergeable || take == total)
            kvmpy_net_copy(q, c, frame, room, take, nb);
        n->heads[nchains] = c->head;
        n->takes[nchains++] = (uint32_t)take;
        room += take;
        if (!n->mergeable)
            break;
    }
    if (room < total) {
        n->rx_dropped++;
        for (uint32_t i = 0; i < nchains; i++)
            kvmpy_vq_push(q, n->heads[i], 0, 0);
    } else {
        if (nb[0])
            *nb[0] = (uint8_t)nchains;
        if (nb[1])
            *nb[1] = (uint8_t)(nchains >> 8);
        for (uint32_t i = 0; i < nchains; i++)
            kvmpy_vq_push(q, n->heads[i], n->takes[i], n->takes[i]);
        n->rx_packets++;
        n->rx_bytes += total - KVMPY_NET_HDR;
    }
    for (uint32_t i = 0; i < njunk; i++)
        kvmpy_vq_push(q, junk[i], 0, 0);
    n->pushed += nchains + njunk;
    return KVMPY_NET_DRAINED;
}

/* VirtioNet._receive for one queue pair: read frames from the TAP and place them until the TAP
   is empty (DRAINED), the guest has no room (NOBUF, frame kept), a frame needs the MAC tables
   (FILTER, frame kept: Python sets pass_filter or drops it), a read failed (NOTE), the budget is
   spent (BURST) or the ring is broken (ERROR, the frame is gone as in Python). */
static int kvmpy_net_rx(struct kvmpy_vq *q, struct kvmpy_net *n, struct kvmpy_chain *c)
{
    kvmpy_net_clear(n);
    while (n->done < n->budget) {
        if (n->frame_len == 0) {
            ssize_t r = read(n->fd, n->buf, n->buf_size);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN)
                    return KVMPY_NET_DRAINED;
                n->rx_dropped++;
                n->io_errno = errno;
                return KVMPY_NET_NOTE;
            }
            if (r == 0)
                return KVMPY_NET_DRAINED;
            if (r < KVMPY_NET_HDR + KVMPY_NET_ETH) {
                n->rx_dropped++;    /* as Python's _read_frame: a runt costs none of the budget */
                continue;
            }
            n->frame_len = (uint32_t)r;
            int verdict = kvmpy_net_filter(n, n->buf + KVMPY_NET_HDR);
            if (verdict < 0)
                return KVMPY_NET_FILTER;    /* not counted in done: Python's frame */
            if (verdict == 0) {
                n->frame_len = 0;
                n->rx_filtered++;
                n->done++;
                continue;
            }
        }
        int r = kvmpy_net_place(q, n, c);
        if (r == KVMPY_VQ_ERROR) {
            n->frame_len = 0;
            return r;
        }
        if (r == KVMPY_NET_NOBUF)
            return r;
        n->frame_len = 0;
        n->done++;
    }
    return KVMPY_NET_BURST;
}

/* VirtioNet._transmit/_send: every available chain (up to budget) is checked and written to
   the TAP as it is (header included), then returned with 0 bytes written. */
static int kvmpy_net_tx(struct kvmpy_vq *q, struct kvmpy_net *n, struct kvmpy_chain *c)
{
    kvmpy_net_clear(n);
    for (; n->done < n->budget; n->done++) {
        int r = kvmpy_vq_pop(q, c);
        if (r != KVMPY_VQ_CHAIN)
            return r == KVMPY_VQ_EMPTY ? KVMPY_NET_DRAINED : r;
        uint64_t len = c->readable_len;
        int ok = n->link_up && len >= KVMPY_NET_HDR + KVMPY_NET_ETH && len <= KVMPY_NET_HDR + KVMPY_NET_MAX_FRAME;
        if (ok) {
            uint8_t head[2] = {0, 0};
            uint32_t got = 0;
            for (uint32_t i = 0; i < c->nread && got < 2; i++)
                for (uint32_t k = 0; k < c->len[i] && got < 2; k++)
                    head[got++] = ((const uint8_t *)c->iov[i].iov_base)[k];
            uint8_t flags = head[0], gso = head[1], type = gso & (uint8_t)~KVMPY_NET_GSO_ECN;
            if ((type && (type >= 32 || !((n->gso_ok >> type) & 1))) || ((gso & KVMPY_NET_GSO_ECN) && !n->ecn_ok)
                || ((flags & KVMPY_NET_F_NEEDS_CSUM) && !n->csum_ok))
                ok = 0;
        }
        if (ok) {
            ssize_t w;
            do
                w = writev(n->fd, c->iov, (int)c->nread);
            while (w < 0 && errno == EINTR);
            if (w < 0) {
                n->tx_dropped++;
                n->io_errno = errno;
                kvmpy_vq_push(q, c->head, 0, c->writable_len);
                n->pushed++;
                n->done++;
                return KVMPY_NET_NOTE;
            }
            n->tx_packets++;
            n->tx_bytes += len - KVMPY_NET_HDR;
        } else {
            n->tx_dropped++;
        }
        kvmpy_vq_push(q, c->head, 0, c->writable_len);
        n->pushed++;
    }
    return KVMPY_NET_BURST;
}

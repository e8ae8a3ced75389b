/* Shared by netfast.c and, read as text by _build.py, by the cffi cdef: the C virtio-net data
   path's record and return codes (cdef-parseable: plain struct, integer #defines only). */
#define KVMPY_NET_DRAINED 0     /* rx: the TAP has no frame; tx: the ring is empty */
#define KVMPY_NET_BURST 1       /* the budget is spent, work may remain: call again later */
#define KVMPY_NET_NOBUF 2       /* rx: the frame in buf waits for the guest's next buffers */
#define KVMPY_NET_FILTER 3      /* rx: the frame in buf needs the MAC tables: Python keeps
                                   it (call again) or drops it (frame_len = 0) */
#define KVMPY_NET_NOTE 4        /* a TAP read or write failed: io_errno for Python to log */
/* and KVMPY_VQ_ERROR (-1): the ring is broken, kvmpy_vq.msg says why */

struct kvmpy_net {
    int fd;                     /* this queue pair's TAP fd (non-blocking) */
    uint8_t mac[6];
    uint8_t mergeable;          /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    uint8_t link_up;
    /* the receive filter as far as C decides it (RxFilter.accepts); MAC tables are Python's */
    uint8_t promisc, nouni, nomulti, nobcast, alluni, allmulti;
    /* tx: what the guest may ask of the TAP (VirtioNet._send's checks) */
    uint8_t csum_ok, ecn_ok;
    uint32_t gso_ok;            /* bit g set: gso_type g (ECN bit masked off) is allowed */
    uint8_t *buf;               /* one frame with its header, buf_size bytes */
    uint32_t buf_size;
    uint32_t frame_len;         /* > 0: a frame waits in buf */
    uint32_t *heads, *takes;    /* scratch: one frame's chains, max_chains of each */
    uint32_t max_chains;
    uint32_t budget;            /* frames (rx) or chains (tx) per call */
    uint32_t done;              /* of the budget, used by the last call */
    int io_errno;
    /* counted during the last call (Python adds them to NetStats) */
    uint64_t rx_packets, rx_bytes, rx_dropped, rx_filtered, bad_buffers, tx_packets, tx_bytes, tx_dropped, pushed;
};

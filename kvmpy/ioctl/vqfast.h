/* Shared by vqfast.c and, read as text by _build.py, by the cffi cdef: one definition of the
   C virtio data path's structs and return codes. cdef-parseable on purpose: plain structs and
   integer #defines only (no include guard, no includes; vqfast.c includes it once). */
/* return codes */
#define KVMPY_VQ_EMPTY 0
#define KVMPY_VQ_CHAIN 1        /* pop: a chain is in the kvmpy_chain; blk_run: Python handles it */
#define KVMPY_VQ_NOTE 2         /* blk_run: a request finished with something for Python to log */
#define KVMPY_VQ_ERROR -1       /* the ring is broken: kvmpy_vq.msg says why */

/* dirty: GuestMemory's userspace dirty map for the range (a byte per page), or NULL */
struct kvmpy_ram { uint64_t gpa; uint64_t size; uint8_t *hva; uint8_t *dirty; };

struct kvmpy_vq {
    uint8_t *desc, *avail, *used;
    const struct kvmpy_ram *ram;
    uint32_t nram;
    uint32_t size;
    uint16_t last_avail_idx, used_idx;
    uint8_t event_idx, indirect;
    char msg[160];
};

struct kvmpy_chain {
    uint32_t head, nseg, nread;
    uint64_t readable_len, writable_len;
    uint64_t *gpa;
    uint32_t *len;
    struct iovec *iov;
};

struct kvmpy_blk {
    int fd, direct_fd, readonly;
    uint64_t capacity;
    int direct_errno, io_errno, io_short, io_write;
    uint64_t pushed, completed, direct_reqs;
    /* block migration: a byte per 1 << block_shift bytes of the image, set to 1 after every
       write C makes (kvmpy.devices.virtio.blkdirty); NULL while nobody tracks */
    uint8_t *dirty;
    uint64_t dirty_blocks;
    uint32_t block_shift;
};

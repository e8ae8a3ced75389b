/* Multiboot v1 a.out-kludge guest (flag bit 16): a flat image whose header gives the load
 * addresses. Prints a marker and leaves through debug-exit with status 2*0x11+1 = 35. */
#include "boot_common.inc"
#ifndef LOAD_ADDR
#define LOAD_ADDR 0x200000             /* mb_aout_low.bin: 0x8000, below the loader's usual tables */
#endif
	.set LOAD, LOAD_ADDR
	.text
	.code32
	.globl _start
	.globl entry
header:
	.long 0x1BADB002
	.long 0x00010002
	.long -(0x1BADB002 + 0x00010002)
	.long LOAD                     /* header_addr */
	.long LOAD                     /* load_addr */
	.long image_end - header + LOAD /* load_end_addr */
	.long bss_end - header + LOAD  /* bss_end_addr */
	.long entry - header + LOAD    /* entry_addr */
entry:
	movl $0x90000, %esp
	cmpl $0x2BADB002, %eax
	jne 1f
	movl $(msg - header + LOAD), %esi
	PUTS
	/* the bss must have been zeroed by the loader */
	cmpl $0, (bss - header + LOAD)
	jne 1f
	DEBUG_EXIT 0x11
1:	DEBUG_EXIT 0x7f
	hlt
msg:	.asciz "MB-AOUT ok\n"
	.align 4
image_end:
bss:	.long 0
	.space 60
bss_end:

/* Multiboot v1 ELF32 guest that reads QEMU's fw_cfg as a kernel written for QEMU would: checks
 * the signature "QEMU" and the DMA feature bit through the selector/data ports (0x510/0x511),
 * takes the first file of the directory (key 0x19), DMAs it into a buffer (0x514/0x518, big-endian
 * halves), prints "FWCFG <contents>" on COM1 and leaves through debug-exit (status 2*0x11+1 = 35). */
#include "boot_common.inc"
	MULTIBOOT_HEADER

	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	movw $0x510, %dx               /* select the signature */
	xorl %eax, %eax
	outw %ax, %dx
	call read4
	cmpl $0x554d4551, %eax         /* "QEMU" */
	jne bad
	movw $0x510, %dx               /* the feature ID: DMA is bit 1 */
	movw $1, %ax
	outw %ax, %dx
	call read4
	testl $2, %eax
	jz bad
	movw $0x510, %dx               /* the file directory: count, then {size, select, reserved, name} */
	movw $0x19, %ax
	outw %ax, %dx
	call read4
	bswap %eax
	testl %eax, %eax
	jz bad
	call read4
	bswap %eax
	cmpl $200, %eax
	ja bad
	movl %eax, %ebx                /* size of the first file */
	call read4
	xchgb %al, %ah                 /* big-endian select */
	movzwl %ax, %eax
	shll $16, %eax
	orl $0x0a, %eax                /* SELECT | READ */
	bswap %eax
	movl %eax, access
	movl %ebx, %eax
	bswap %eax
	movl %eax, access+4
	movl $0, access+8
	movl $buf, %eax
	bswap %eax
	movl %eax, access+12
	movw $0x514, %dx               /* DMA address: high half (0), then the low half starts it */
	xorl %eax, %eax
	outl %eax, %dx
	movl $access, %eax
	bswap %eax
	movw $0x518, %dx
	outl %eax, %dx
	cmpl $0, access                /* control is 0 when done, the error bit otherwise */
	jne bad
	movl $hello, %esi
	PUTS
	movl $buf, %esi
	PUTS
	movl $nl, %esi
	PUTS
	DEBUG_EXIT 0x11
bad:
	movl $oops, %esi
	PUTS
	DEBUG_EXIT 0x7f
	hlt

read4:	/* four bytes from the data port, the first in %al */
	movw $0x511, %dx
	xorl %eax, %eax
	movl $4, %ecx
1:	inb %dx, %al
	rorl $8, %eax
	loop 1b
	ret

	.section .rodata
hello:	.asciz "FWCFG "
nl:	.asciz "\n"
oops:	.asciz "FWCFG bad\n"

	.data
	.align 16
access:	.space 16
buf:	.space 256

/* Multiboot guest probing PCI configuration mechanism #1 like an OS: the host bridge at 00:00.0
 * must answer 8086:1237, absent functions and other buses all-ones, and the 0xCF8 latch must
 * read back (and ignore sub-dword writes). Exit status 2*0x14+1 = 41 when every answer is right, 255 otherwise. */
#include "boot_common.inc"
	MULTIBOOT_HEADER

.macro CFG_READ addr
	movw $0xcf8, %dx
	movl $\addr, %eax
	outl %eax, %dx
	movw $0xcfc, %dx
	inl %dx, %eax
.endm

	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	CFG_READ 0x80000000            /* 00:00.0 vendor/device */
	cmpl $0x12378086, %eax
	jne bad
	CFG_READ 0x80010000            /* bus 1 */
	cmpl $0xffffffff, %eax
	jne bad
	movl $256, %ecx                /* every function of slots 24..31: none exist */
1:	movl %ecx, %eax
	addl $(24 << 3) - 1, %eax
	shll $8, %eax
	orl $0x80000000, %eax
	movw $0xcf8, %dx
	outl %eax, %dx
	movw $0xcfc, %dx
	inl %dx, %eax
	cmpl $0xffffffff, %eax
	jne bad
	loop 1b
	movw $0xcf8, %dx
	movl $0x8000f800, %eax
	outl %eax, %dx
	inl %dx, %eax
	cmpl $0x8000f800, %eax
	jne bad
	movw $0xcfa, %dx               /* sub-dword writes in 0xCF8..0xCFB leave the latch alone */
	movb $0x12, %al                /* (KVM may queue them in its coalesced ring, not exit) */
	outb %al, %dx
	movw $0xcf8, %dx
	movw $0x3456, %ax
	outw %ax, %dx
	inl %dx, %eax
	cmpl $0x8000f800, %eax
	jne bad
	CFG_READ 0x00000000            /* enable bit clear: no configuration cycle */
	cmpl $0xffffffff, %eax
	jne bad
	movl $ok, %esi
	PUTS
	DEBUG_EXIT 0x14
bad:
	movl $oops, %esi
	PUTS
	DEBUG_EXIT 0x7f
	hlt

	.section .rodata
ok:	.asciz "PCI probe ok\n"
oops:	.asciz "PCI probe wrong answer\n"

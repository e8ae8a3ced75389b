/* Multiboot v1 ELF32 guest for lifecycle, snapshot and migration tests: counts forever.
 * Each iteration increments the dword at COUNTER and stores it into one of 64 pages at PAGES
 * (so the guest keeps dirtying memory); every 4096 iterations it prints "tick XXXXXXXX\n" (the
 * count / 4096, hex) on COM1 and writes that tick to port 0x520 (for the API's port hooks; 0x510 is fw_cfg).
 * A save/restore that loses or repeats a step shows as a gap or a repeat in the ticks. */
#include "boot_common.inc"
	MULTIBOOT_HEADER

	.set COUNTER, 0x300000
	.set PAGES, 0x400000
	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	movl $hello, %esi
	PUTS
loop:
	incl COUNTER
	movl COUNTER, %eax
	movl %eax, %ecx
	andl $63, %ecx
	shll $12, %ecx
	movl %eax, PAGES(%ecx)
	testl $0xfff, %eax
	jnz loop
	movl $tick, %esi
	PUTS
	movl COUNTER, %ebx
	shrl $12, %ebx
	movw $0x520, %dx
	movl %ebx, %eax
	outl %eax, %dx
	movl $8, %ecx
hex:	roll $4, %ebx
	movl %ebx, %eax
	andl $15, %eax
	movb digits(%eax), %al
	movw $0x3f8, %dx
	outb %al, %dx
	loop hex
	movb $10, %al
	outb %al, %dx
	jmp loop

	.section .rodata
hello:	.asciz "counter guest\n"
tick:	.asciz "tick "
digits:	.ascii "0123456789abcdef"

/* Multiboot v1 ELF32 guest: checks EAX/EBX from the loader, prints the command line kvmpy
 * passed in the multiboot info, and leaves through the debug-exit port (status 2*0x10+1 = 33). */
#include "boot_common.inc"
	MULTIBOOT_HEADER

	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	cmpl $0x2BADB002, %eax
	jne bad
	movl %ebx, %edi                /* multiboot_info */
	movl $hello, %esi
	PUTS
	testl $4, (%edi)               /* flags bit 2: cmdline valid */
	jz bad
	movl 16(%edi), %esi
	PUTS
	movl $nl, %esi
	PUTS
	DEBUG_EXIT 0x10
bad:
	movl $oops, %esi
	PUTS
	DEBUG_EXIT 0x7f
	hlt

	.section .rodata
hello:	.asciz "MB-ELF cmdline="
nl:	.asciz "\n"
oops:	.asciz "MB-ELF bad loader state\n"
